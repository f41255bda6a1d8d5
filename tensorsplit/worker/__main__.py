"""`python -m tensorsplit.worker`: one rank of a world.

Started by the tensorsplit launcher, it takes the world from TENSORSPLIT_WORLD (JSON) and, on rank 0,
the job from the file TENSORSPLIT_JOB names. Under plain torchrun it parses the same command line as
`tensorsplit` does:

    torchrun --nproc-per-node 2 -m tensorsplit.worker generate -p "Hello"
"""
import os
import sys

from ..spec import WORLD_ENV

if os.environ.get(WORLD_ENV):
    from .main import main_from_env
    sys.exit(main_from_env())

from ..cli import main  # noqa: E402 - torchrun: the command line, parsed here once

main(prog_name="python -m tensorsplit.worker")
