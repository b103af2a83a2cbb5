"""Run by tests/test_train.py under torchrun: ``lowrank pretrain`` that also checks how it leaves
the process group.

Usage: torchrun --nproc_per_node 2 tests/dist/teardown_check.py <pretrain arguments>

When ``destroy_process_group`` is called no DDP wrapper may be alive: its C++ reducer holds the
process group and, freed later without releasing the GIL, deadlocks gloo's destructor (see
``lowrank.run.loop.Trainer.release_wrapper``). A wrapper still alive there makes the run exit 3.
"""

import gc
import sys

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lowrank import cli

_destroy = dist.destroy_process_group
alive: list[int] = []


def checked_destroy(*args, **kwargs):
    gc.collect()
    alive.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
    return _destroy(*args, **kwargs)


dist.destroy_process_group = checked_destroy
code = cli.main(sys.argv[1:])
if code == 0 and alive != [0]:
    print(f"teardown: {alive} DDP wrapper(s) alive at destroy_process_group", file=sys.stderr)
    code = 3
sys.exit(code)
