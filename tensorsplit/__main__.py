"""`python -m tensorsplit ...` is the same as the `tensorsplit` command."""
from .cli import main

main(prog_name="tensorsplit")
