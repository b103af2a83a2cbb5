"""Projection-update time: randomized range finder vs full SVD (GaLore's refresh), same gradient.

The gradient is ``U diag(σ) Vᵀ`` with random orthonormal ``U``, ``V`` and a power-law spectrum
``σ_k = k^-decay`` (real gradients have fast-decaying spectra; ``decay=1`` is a hard case for a
sketch because consecutive singular values are close). Quality is reported as the fraction of the
SVD basis's captured energy ``‖PᵀG‖²`` that the randomized basis captures (the quantity GaLore
cares about), the subspace overlap ``‖Pᵀ P_svd‖_F² / r`` (mean squared cosine of the principal
angles, 1 = same subspace) and the spectral distance ``‖P Pᵀ − P_svd P_svdᵀ‖₂`` (the worst
direction; close to 1 whenever σ_r ≈ σ_{r+1}, as with a power law at r = 512, because then the
top-r subspace itself is ill-defined).

    python benchmarks/bench_projection_time.py [--rows 2048 --cols 5461 --rank 512 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_result  # noqa: E402

from lowrank.optim.projection import project, randomized_basis, svd_basis  # noqa: E402


def synthetic_gradient(rows: int, cols: int, decay: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    spectrum = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    return (u * spectrum) @ v.t()


def summary(times: list[float]) -> dict[str, object]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=5461)
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--decay", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed SVD runs (median reported)")
    parser.add_argument("--repeats-randomized", type=int, default=7, help="timed randomized runs (median)")
    parser.add_argument("--oversample", type=int, default=8)
    parser.add_argument("--power-iters", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    grad = synthetic_gradient(args.rows, args.cols, args.decay, seed=0)
    print(f"gradient {tuple(grad.shape)}, rank {args.rank}, threads {torch.get_num_threads()}", flush=True)

    exact = svd_basis(grad, args.rank)
    exact_energy = project(grad, exact).norm() ** 2
    exact_projector = exact @ exact.t()

    def randomized(q: int) -> torch.Tensor:
        return randomized_basis(grad, args.rank, seed=(0, 0, 0), oversample=args.oversample, power_iters=q)

    for q in args.power_iters:  # warm-up
        randomized(q)
    # Interleaved rounds, so that load from other processes on a shared machine hits all methods.
    svd_times: list[float] = []
    randomized_times: dict[int, list[float]] = {q: [] for q in args.power_iters}
    for round_index in range(max(args.repeats, args.repeats_randomized)):
        if round_index < args.repeats:
            start = time.perf_counter()
            svd_basis(grad, args.rank)
            svd_times.append(time.perf_counter() - start)
        if round_index < args.repeats_randomized:
            for q in args.power_iters:
                start = time.perf_counter()
                randomized(q)
                randomized_times[q].append(time.perf_counter() - start)
    svd_time = summary(svd_times)
    print(f"svd          median {svd_time['median_s']:.3f}s", flush=True)

    results = {}
    for q in args.power_iters:
        timing = summary(randomized_times[q])
        basis = randomized(q)
        energy = float(project(grad, basis).norm() ** 2 / exact_energy)
        distance = float(torch.linalg.matrix_norm(basis @ basis.t() - exact_projector, ord=2))
        overlap = float((basis.t() @ exact).norm() ** 2 / basis.shape[1])
        results[f"power_iters={q}"] = {
            **timing,
            "speedup_vs_svd": svd_time["median_s"] / timing["median_s"],
            "energy_ratio": energy,
            "subspace_overlap": overlap,
            "projector_distance": distance,
        }
        print(f"randomized q={q}  median {timing['median_s']:.3f}s  speedup {svd_time['median_s'] / timing['median_s']:.1f}x"
              f"  energy {energy:.6f}  overlap {overlap:.4f}", flush=True)

    payload = {
        "gradient": {"shape": [args.rows, args.cols], "spectrum": f"k^-{args.decay}", "dtype": "float32"},
        "rank": args.rank,
        "oversample": args.oversample,
        "svd": svd_time,
        "randomized": results,
        "load_average_1_5_15": list(os.getloadavg()),
        "default_power_iters": 2,
        "note": "svd = torch.linalg.svd(full_matrices=False) + slice, exactly GaLore's refresh. "
                "Timings are medians of interleaved runs on a possibly shared machine.",
    }
    print("wrote", write_result("projection_time", payload, args.out))


if __name__ == "__main__":
    main()
