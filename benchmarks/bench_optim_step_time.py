"""Optimizer step time on the LLaMA-60M shape, CPU: ProjectedAdamW vs torch AdamW and peers.

Every optimizer gets its own copy of the model; all copies share one set of random gradients
(the step, not the model, is timed; no optimizer here writes to ``.grad``). Each optimizer takes
``--warmup`` steps first (the first one computes projection bases, reported separately as
``first_step_s``), then the timed steps run round-robin (one step of each optimizer per round) so
that load from other processes on a shared machine affects all of them alike; the median is
reported. With ``update_proj_gap=200`` no timed step recomputes a basis, so the timed steps are
the steady state; the amortised refresh cost is about ``first_step_s / 200`` per step.

    python benchmarks/bench_optim_step_time.py [--steps 15 --warmup 2 --rank 128]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_result  # noqa: E402
from llama60m import LLAMA_60M, fill_grads, llama_60m  # noqa: E402
from peers import build_peer, projected_groups  # noqa: E402

from lowrank.optim import ProjectedAdamW  # noqa: E402


def factories(rank: int) -> dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]]:
    out: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
        "torch_adamw_foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True),
        "torch_adamw_forloop": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=False),
    }
    # Peers through benchmarks/peers.py, as in every other benchmark (APOLLO at its scale 1).
    for label, peer, package, scale in (("galore_torch", "galore-torch", "galore_torch", 0.25), ("fira", "fira", "fira", 0.25),
                                        ("apollo_torch", "apollo-torch", "apollo_torch", 1.0)):
        if importlib.util.find_spec(package) is not None:
            out[label] = lambda m, peer=peer, scale=scale: build_peer(peer, m, lr=1e-3, rank=rank, update_proj_gap=200, scale=scale)
    out.update(
        {
            "ours_plain": lambda m: ProjectedAdamW(m.parameters(), lr=1e-3),
            "ours_plain_foreach": lambda m: ProjectedAdamW(m.parameters(), lr=1e-3, foreach=True),
            "ours_svd": lambda m: ProjectedAdamW(projected_groups(m, projection="svd", rank=rank, scale=0.25), lr=1e-3),
            "ours_randomized": lambda m: ProjectedAdamW(
                projected_groups(m, projection="randomized", rank=rank, scale=0.25), lr=1e-3
            ),
            "ours_random_apollo": lambda m: ProjectedAdamW(projected_groups(m, projection="random", rank=rank), lr=1e-3),
            "ours_svd_fira": lambda m: ProjectedAdamW(
                projected_groups(m, projection="svd", rank=rank, scale=0.25, residual="fira"), lr=1e-3
            ),
            "ours_sparse_0.25": lambda m: ProjectedAdamW(projected_groups(m, density=0.25), lr=1e-3),
            "ours_spike_clip": lambda m: ProjectedAdamW(m.parameters(), lr=1e-3, spike_threshold=5000.0),
        }
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    reference = llama_60m()
    fill_grads(reference)
    grads = [p.grad for p in reference.parameters()]
    reference.zero_grad(set_to_none=True)  # so deepcopy does not copy them
    n_params = sum(p.numel() for p in reference.parameters())
    optimizers: dict[str, torch.optim.Optimizer] = {}
    results: dict[str, Any] = {}
    for name, factory in factories(args.rank).items():
        if args.only and name not in args.only:
            continue
        model = copy.deepcopy(reference)
        for p, grad in zip(model.parameters(), grads):
            p.grad = grad
        optimizer = factory(model)
        start = time.perf_counter()
        optimizer.step()
        results[name] = {"first_step_s": time.perf_counter() - start}
        for _ in range(max(args.warmup - 1, 0)):
            optimizer.step()
        optimizers[name] = optimizer
        print(f"{name:24s} first step {results[name]['first_step_s']:6.2f} s", flush=True)

    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.steps):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        results[name].update(
            {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "times_s": values}
        )
        print(f"{name:24s} median {results[name]['median_s'] * 1e3:8.1f} ms  min {min(values) * 1e3:8.1f} ms",
              flush=True)

    base = results.get("torch_adamw_foreach", {}).get("median_s")
    if base:
        for entry in results.values():
            entry["vs_torch_adamw_foreach"] = entry["median_s"] / base

    payload = {
        "model": {"config": LLAMA_60M, "parameters": n_params},
        "rank": args.rank,
        "steps": args.steps,
        "warmup": args.warmup,
        "load_average_1_5_15": list(os.getloadavg()),
        "note": "Median wall time of optimizer.step() after warm-up, optimizers interleaved round-robin; "
                "CPU, fp32. On a shared machine compare ratios rather than absolute times.",
        "results": results,
    }
    print("wrote", write_result("optim_step_time", payload, args.out))


if __name__ == "__main__":
    main()
