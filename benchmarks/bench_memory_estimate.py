"""How close the analytic memory estimate comes to measured training steps, per method.

    python benchmarks/bench_memory_estimate.py [--model llama_9m --rank 32 --batch-size 4 --seq-len 256]

For each method: the estimate (meta device, no allocation) and a measurement of real CPU steps
(exact tensor bytes, and the CPU profiler's peak split into forward/backward and the optimizer
step). Weights, gradients and optimizer state agree to the byte (the tests check that); this
records the part that is only an estimate, activations and peaks. Writes
benchmarks/results/memory_estimate_vs_measured.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from lowrank.memory import estimate  # noqa: E402
from lowrank.memory.build import available  # noqa: E402
from lowrank.memory.measure import measure_method  # noqa: E402


def relative(measured: int | None, estimated: int) -> float | None:
    return None if measured is None else (measured - estimated) / estimated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_9m")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()

    rows = {}
    options = dict(rank=args.rank, batch_size=args.batch_size, seq_len=args.seq_len)
    for method in available():
        estimated = estimate(args.model, method, **options)
        measured = measure_method(args.model, method, steps=args.steps, **options)
        rows[method] = {
            "estimated_total": estimated.total,
            "estimated_activations": estimated.activations,
            "measured_saved_activations": measured.activations,
            "measured_peak_forward_backward": measured.peak_forward_backward,
            "measured_peak_optimizer_step": measured.peak_optimizer_step,
            "model_state_exact": estimated.model_state == measured.model_state,
            "peak_forward_backward_vs_estimate": relative(measured.peak_forward_backward, estimated.total),
            "peak_optimizer_step_vs_estimate": relative(measured.peak_optimizer_step, estimated.total),
        }
        row = rows[method]
        print(f"{method:18s} estimate {estimated.total / 2**20:8.1f} MiB  fwd/bwd peak {row['peak_forward_backward_vs_estimate']:+.1%}  "
              f"optimizer-step peak {row['peak_optimizer_step_vs_estimate']:+.1%}  state exact: {row['model_state_exact']}")
    path = write_result("memory_estimate_vs_measured", {"model": args.model, **options, "steps": args.steps,
                                                         "device": "cpu", "results": rows}, args.out_dir)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
