"""Start ``tests/dist/cli_runs.py`` under ``torchrun`` (2 CPU ranks) for a plan of ``lowrank``
command lines, while the test process does other work (the one-process references).

Usage::

    with torchrun_plan(plan, base) as records:   # base/plan.json, base/ranks.log, base/records/
        ...                                       # runs here meanwhile
    # on exit: the ranks have finished (or the test fails with the end of their log)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

HELPER = Path(__file__).parent / "cli_runs.py"
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def torchrun_plan(plan: list[dict], base: Path, *, nproc: int = 2, timeout: float = 600):
    (base / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(base / "ranks.log", "w") as log:  # a file, not a pipe: nobody reads a pipe meanwhile
        process = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(HELPER),
             str(base / "plan.json"), str(base / "records")], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base)
        try:
            yield base / "records"
            process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, (base / "ranks.log").read_text()[-6000:]
