"""Time LowRankLinear.refactorize() (thin QR + r×r SVD) against a dense SVD of B @ A.

    python benchmarks/bench_refactorize.py [--m 2048 --n 5461 --rank 512]

Writes benchmarks/results/refactorize.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_result  # noqa: E402

from lowrank import LowRankLinear  # noqa: E402
from lowrank.linalg import balanced_factors  # noqa: E402


def dense_refactorize(B: torch.Tensor, A: torch.Tensor):
    """The naive route: form the m×n product and take its SVD."""
    u, s, vt = torch.linalg.svd(B @ A, full_matrices=False)
    r = B.shape[1]
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vt[:r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--n", type=int, default=5461)
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    layer = LowRankLinear(args.n, args.m, args.rank, bias=False)
    B, A = layer.B.detach().clone(), layer.A.detach().clone()

    qr_seconds = median_seconds(layer.refactorize, repeats=args.repeats)
    dense_seconds = median_seconds(lambda: dense_refactorize(B, A), repeats=args.repeats)

    new_B, new_A, _ = balanced_factors(B, A)
    dense_B, dense_A = dense_refactorize(B, A)
    product = B @ A
    error_qr = float((new_B @ new_A - product).norm() / product.norm())
    error_dense = float((dense_B @ dense_A - product).norm() / product.norm())

    path = write_result(
        "refactorize",
        {
            "shape": {"m": args.m, "n": args.n, "rank": args.rank},
            "qr_route_seconds": qr_seconds,
            "dense_svd_seconds": dense_seconds,
            "speedup": dense_seconds / qr_seconds,
            "relative_error_qr_route": error_qr,
            "relative_error_dense_svd": error_dense,
            "repeats": args.repeats,
        },
        args.out_dir,
    )
    print(f"refactorize {args.m}x{args.n} rank {args.rank}: QR route {qr_seconds:.3f}s, dense SVD {dense_seconds:.3f}s "
          f"({dense_seconds / qr_seconds:.1f}x); relative error {error_qr:.1e} vs {error_dense:.1e} -> {path}")


if __name__ == "__main__":
    main()
