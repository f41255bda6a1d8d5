"""Communication: backend choice, the world's group object, and an in-process thread world."""
from .backend import BackendChoice, choose_backend
from .group import CommGroup, init_comm

__all__ = ["BackendChoice", "CommGroup", "choose_backend", "init_comm"]
