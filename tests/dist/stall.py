"""Run by tests/test_hardening.py under torchrun: `lowrank pretrain` where one rank stops answering.

Usage: torchrun --nproc_per_node 2 tests/dist/stall.py STALL_RANK STALL_STEP -- <pretrain arguments>
Rank STALL_RANK sleeps for ten minutes before its step STALL_STEP, as a hung data loader or a dead
GPU would; the others must end with one line naming it, within --dist-timeout.
"""

import os
import sys
import time

from lowrank import cli
from lowrank.run import loop

stall_rank, stall_step = int(sys.argv[1]), int(sys.argv[2])
arguments = sys.argv[sys.argv.index("--") + 1:]
original = loop.Trainer._train_step


def stalling_step(self):
    if self.dist.rank == stall_rank and self.step + 1 == stall_step:
        time.sleep(600)  # torchrun ends it when rank 0 exits
    return original(self)


loop.Trainer._train_step = stalling_step
sys.exit(cli.main(arguments))
