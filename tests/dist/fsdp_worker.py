"""Rank entry point of tests/test_fsdp.py: ``python tests/dist/fsdp_worker.py OUT ONE_RANK_CHECKPOINT``
spawns 2 gloo ranks that run every case of fsdp_cases.py under FSDP2 and the DCP round trips;
rank 0 writes the results to ``OUT/fsdp.pt``."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowrank.distributed import end_process_group

WORLD = 2


def rank_main(rank: int, out: str, one_rank_checkpoint: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=WORLD)
    ok = False
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import fsdp_cases as cases
        from torch.distributed.device_mesh import init_device_mesh

        from lowrank.distributed.fsdp import shard_model

        mesh = init_device_mesh("cpu", (WORLD,))

        def shard(model):
            return shard_model(model, mesh=mesh, mixed_precision=False)

        results = {name: cases.run_case(case, shard) for name, case in cases.CASES.items()}
        # bf16 compute, fp32 reduction (MixedPrecisionPolicy), with a merge event
        results["relora_bf16"] = cases.run_case(cases.CASES["relora"], lambda m: shard_model(m, mesh=mesh, mixed_precision=True))
        two = Path(out) / "two"
        steps, after = range(cases.DCP_STEPS), range(cases.DCP_SAVE_AT, cases.DCP_STEPS)
        results["dcp"] = {
            "uninterrupted": cases.dcp_run(cases.DCP_CASE, steps, shard=shard, save=two),
        }
        checkpoint = results["dcp"]["uninterrupted"]["checkpoint"]
        results["dcp"]["resumed_2_from_2"] = cases.dcp_run(cases.DCP_CASE, after, shard=shard, resume=checkpoint)
        results["dcp"]["resumed_2_from_1"] = cases.dcp_run(cases.DCP_CASE, after, shard=shard, resume=one_rank_checkpoint)
        if rank == 0:
            torch.save(results, Path(out) / "fsdp.pt")
        ok = True
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        end_process_group(completed=ok)


if __name__ == "__main__":
    mp.spawn(rank_main, args=(sys.argv[1], sys.argv[2]), nprocs=WORLD)
