"""`python -m tensorsplit.worker <command> [options]`: the worker entry point, for torchrun.

    torchrun --nproc-per-node 2 -m tensorsplit.worker generate -p "Hello"

The `tensorsplit` launcher starts the same entry point once per rank.
"""
from ..cli import main

main(prog_name="python -m tensorsplit.worker")
