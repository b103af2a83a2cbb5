"""Optimizer-state bytes on the LLaMA-60M shape: peers measured by stepping them, ours in every mode.

Every optimizer takes one step on random gradients; then the tensors reachable from its ``state``
(including tensors inside peers' projector objects) are counted two ways:

* ``logical_bytes``: ``numel × element_size`` of every tensor found (what a naive count reports);
* ``storage_bytes``: bytes of the distinct storages behind them (the memory actually held; differs
  when a tensor is a view that keeps a larger buffer alive, or when one tensor is shared).

For ``ProjectedAdamW`` the result of ``state_bytes()`` is reported next to the count, together
with the analytic expectation (GaLore: ``mr + 2nr`` per ``m ≤ n`` target matrix, see DESIGN 2.8).
Projection applies to the attention/MLP linear weights; embeddings, head and norms use plain Adam.

    python benchmarks/bench_optim_state_bytes.py [--rank 128] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import gc
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
from peers import build_peer, projected_groups, split_targets  # noqa: E402

from lowrank.optim import ProjectedAdamW  # noqa: E402
from lowrank.seeding import subset_size  # noqa: E402


def walk_tensors(obj: Any, seen: set[int] | None = None):
    """Yield every tensor reachable from ``obj`` through containers and object attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from walk_tensors(value, seen)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from walk_tensors(value, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from walk_tensors(vars(obj), seen)


def count_state(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    tensors = list(walk_tensors(dict(optimizer.state)))
    logical = sum(t.numel() * t.element_size() for t in tensors)
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return {"logical_bytes": logical, "storage_bytes": sum(storages.values()), "tensors": len(tensors)}


def expected_ours(model, targets, rank: int, mode: dict[str, Any]) -> int:
    """Analytic bytes (fp32) for ProjectedAdamW; 0-dim limiter/statistic tensors count 4 bytes."""
    target_ids = {id(p) for p in targets}
    statistics = 4 * (int(mode.get("adaptive_clip", False)) + 2 * int(mode.get("norm_scaling", False)))
    total = 0
    for p in model.parameters():
        numel = p.numel()
        if mode.get("all_matrices") or id(p) in target_ids:
            total += statistics
        if id(p) not in target_ids and not (mode.get("all_matrices") and p.dim() == 2):
            total += 2 * numel * 4
            continue
        kind = mode.get("projection")
        if kind is None:
            k = subset_size(numel, mode.get("density", 1.0))
            total += 2 * k * 4
            continue
        m, n = p.shape
        r = min(mode.get("rank", rank), m, n)
        low = r * max(m, n)
        k = subset_size(low, mode.get("density", 1.0))
        total += (min(m, n) * r + 2 * k) * 4
        if kind == "random" or mode.get("residual"):
            total += 4
    return total


def peer_factories(rank: int) -> dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]]:
    """Every peer (benchmarks/peers.py) whose package is installed, with the papers' 60M settings."""
    names = {"adamw": "torch_adamw", "galore-torch": "galore_torch", "fira": "fira", "apollo-torch": "apollo_torch",
             "apollo-torch-mini": "apollo_torch_mini", "adamw8bit": "bnb_adamw8bit", "adam-mini": "adam_mini"}
    factories = {}
    for peer, label in names.items():
        scale = 1.0 if peer.startswith("apollo") else 0.25
        factories[label] = lambda model, peer=peer, scale=scale: build_peer(peer, model, lr=1e-3, rank=rank, scale=scale)
    return factories


def our_modes(rank: int) -> dict[str, dict[str, Any]]:
    return {
        "ours_plain": {},
        "ours_svd": {"projection": "svd", "rank": rank, "scale": 0.25},
        "ours_randomized": {"projection": "randomized", "rank": rank, "scale": 0.25},
        "ours_random_apollo": {"projection": "random", "rank": rank},
        "ours_random_apollo_mini": {"projection": "random", "rank": 1, "scale_type": "tensor", "scale": 128**0.5},
        "ours_svd_fira": {"projection": "svd", "rank": rank, "scale": 0.25, "residual": "fira"},
        "ours_sparse_0.25": {"density": 0.25},
        "ours_sparse_0.25_all_matrices": {"density": 0.25, "all_matrices": True},
        "ours_svd_sparse_0.25": {"projection": "svd", "rank": rank, "scale": 0.25, "density": 0.25},
        "ours_spam_stable_spam": {"spike_threshold": 5000.0, "reset_interval": 500, "reset_warmup": 150,
                                  "adaptive_clip": True, "norm_scaling": True, "all_matrices": True},
    }


def build_ours(model, mode: dict[str, Any]) -> ProjectedAdamW:
    options = {k: v for k, v in mode.items() if k != "all_matrices"}
    if mode.get("all_matrices"):
        return ProjectedAdamW(model.parameters(), lr=1e-3, **options)
    return ProjectedAdamW(projected_groups(model, **options), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these entries")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    model = llama_60m()
    targets, regular = split_targets(model)
    n_params = sum(p.numel() for p in model.parameters())
    results: dict[str, Any] = {}

    def record(name: str, build: Callable[[], torch.optim.Optimizer], mode: dict[str, Any] | None = None):
        if args.only and name not in args.only:
            return
        fill_grads(model)
        optimizer = build()
        start = time.perf_counter()
        optimizer.step()
        entry: dict[str, Any] = {"first_step_s": round(time.perf_counter() - start, 3), **count_state(optimizer)}
        if isinstance(optimizer, ProjectedAdamW):
            reported = optimizer.state_bytes()
            entry["state_bytes_total"] = reported.total
            entry["state_bytes_per_group"] = reported.per_group
            entry["subset_cache_bytes"] = reported.subset_cache
            entry["expected_bytes"] = expected_ours(model, targets, args.rank, mode or {})
            entry["state_bytes_matches_count"] = reported.total == entry["logical_bytes"] == entry["storage_bytes"]
            entry["matches_expected"] = reported.total == entry["expected_bytes"]
        entry["bytes_per_param"] = round(entry["storage_bytes"] / n_params, 4)
        entry["vs_adamw"] = round(entry["storage_bytes"] / (2 * 4 * n_params), 4)
        results[name] = entry
        print(f"{name:32s} storage {entry['storage_bytes'] / 2**20:9.2f} MiB  logical "
              f"{entry['logical_bytes'] / 2**20:9.2f} MiB  ({entry['vs_adamw']:.3f}× AdamW)", flush=True)
        del optimizer
        gc.collect()

    for name, factory in peer_factories(args.rank).items():
        record(name, lambda: factory(model))
    for name, mode in our_modes(args.rank).items():
        record(name, lambda: build_ours(model, mode), mode)

    galore_formula = sum(
        (min(p.shape) * args.rank + 2 * args.rank * max(p.shape)) * 4 for p in targets
    ) + sum(2 * p.numel() * 4 for p in regular)
    payload = {
        "model": {"config": LLAMA_60M, "parameters": n_params, "projected_matrices": len(targets),
                  "projected_parameters": sum(p.numel() for p in targets)},
        "rank": args.rank,
        "galore_formula_bytes": galore_formula,
        "note": "storage_bytes = distinct storages reachable from optimizer.state (the memory held); "
                "logical_bytes = sum of numel*element_size. GaLore/Fira keep a view of the full U or Vh "
                "from torch.linalg.svd as their projector, so storage exceeds logical for them.",
        "results": results,
    }
    print("wrote", write_result("optim_state_bytes", payload, args.out))


if __name__ == "__main__":
    main()
