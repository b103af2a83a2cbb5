"""Run by tests/test_distributed_cli.py under torchrun: several ``lowrank`` command lines, one
after the other, in the same two rank processes (one torchrun start-up for all of them).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/dist/cli_runs.py PLAN.json OUT``

``PLAN.json`` is a list of ``{"name": ..., "argv": [...]}``; each entry is run as
``python -m lowrank ARGV`` would run it (``lowrank.cli.main``: it joins the process group,
trains, and leaves it again, so every entry is a complete run with its own process group).
Each rank writes ``OUT/<name>.rank<r>.json``: the exit code ``main`` returned (what the process
would exit with), what the run wrote to stderr, and its wall time. An entry that raises (a bug,
not a user error) is recorded with exit code 1 and its traceback, and the plan stops there: the
other rank may be waiting in a collective.

Between entries the ranks meet in torchrun's store (both finished the last entry, both start
the next), and each entry's process group joins through a store namespace of its own
(``cli_runs/<index>/``). Both matter after a run that ends with a user error right after joining:
``lowrank`` then leaves the group without a barrier, and the other rank may still be connecting
(it fails to join; under torchrun it would exit 2 as well, silently, as a rank other than 0). The
helper then resets the group counter that ``destroy_process_group`` would have reset, so both
ranks name their next group alike; and a new group never finds an old group's keys (gloo's
addresses of a group already closed) in the shared store. (The group *name* is the same for
every entry, as in separate processes: DTensor caches sharding decisions with the mesh, and a
mesh of the same ranks resolves its group by name.)
"""

from __future__ import annotations

import datetime
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from lowrank import cli


class Tee(io.TextIOBase):
    """stderr for one entry: kept for the record and passed on to the real stderr."""

    def __init__(self, real) -> None:
        self.real, self.parts = real, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        self.real.write(text)
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def getvalue(self) -> str:
        return "".join(self.parts)


_init_process_group = dist.init_process_group


def fresh_store_keys(index: int) -> None:
    """Make ``init_process_group`` (called by ``lowrank`` as under torchrun: env://) join through
    torchrun's store under the prefix ``cli_runs/<index>/``."""

    def init_process_group(*args, **kwargs):
        if "store" not in kwargs and "init_method" not in kwargs:
            timeout = kwargs.get("timeout") or datetime.timedelta(seconds=600)
            client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
            kwargs.update(store=dist.PrefixStore(f"cli_runs/{index}/", client), rank=int(os.environ["RANK"]),
                          world_size=int(os.environ["WORLD_SIZE"]))
        return _init_process_group(*args, **kwargs)

    dist.init_process_group = init_process_group


def meet(store: dist.Store, key: str, rank: int, world: int) -> None:
    """Every rank has reached ``key``."""
    store.set(f"cli_runs/{key}/{rank}", "1")
    store.wait([f"cli_runs/{key}/{r}" for r in range(world)], datetime.timedelta(seconds=600))


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=600))
    real = sys.stderr
    for index, entry in enumerate(plan):
        if dist.is_initialized():  # a run that raised past lowrank's own clean-up
            dist.destroy_process_group()
        c10d._world.group_count = 0  # a failed join leaves it counted up; destroy_process_group resets it
        fresh_store_keys(index)
        meet(store, f"{index}/start", rank, world)
        tee = Tee(real)
        sys.stderr = tee
        started = time.perf_counter()
        failed = False
        try:
            code = cli.main(entry["argv"])
        except BaseException:  # noqa: BLE001 - recorded for the test, which shows it
            code, failed = 1, True
            traceback.print_exc()
        finally:
            sys.stderr = real
        record = {"rc": code, "stderr": tee.getvalue(), "seconds": time.perf_counter() - started}
        (out / f"{entry['name']}.rank{rank}.json").write_text(json.dumps(record))
        if failed:
            return 1
        meet(store, f"{index}/done", rank, world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
