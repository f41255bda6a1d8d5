"""The world's plan, made once where the world starts (world.py), with --split auto's inputs: the
devices' free memory (free_memory.py) and the arithmetic that shares it out (auto_split.py)."""
from .world import AUTO, RankPlan, WorldPlan, check_world, plan_world

__all__ = ["AUTO", "RankPlan", "WorldPlan", "check_world", "plan_world"]
