"""Two CPU ranks on gloo train a tiny MLP under every communication hook of
:mod:`lowrank.distributed.comm` and 1-bit Adam; each rank saves what it saw to ``OUT/rank{r}.pt``.

Usage: ``python tests/dist/comm_ranks.py OUT`` (spawns the 2 ranks itself). ``tests/test_comm.py``
runs it once and checks the results. Besides each hook's own count, every collective's input
bytes are measured by wrapping ``torch.distributed``'s functions, which PyTorch's hooks call
through the module too, so the count can be compared with what was really handed to the wire.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 7  # projected: refreshes at total_step 0, 3, 6
GAP = 3
FREEZE = 3
ONEBIT_STEPS = 40
RESUME_AT = 7  # past the warm-up: the error buffers exist


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))


_TEACHER = None


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own batch for ``step``; the targets come from a fixed random teacher."""
    global _TEACHER
    if _TEACHER is None:
        _TEACHER = make_model(seed=123)
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 16, generator=gen)
    with torch.no_grad():
        return x, _TEACHER(x)


class Wire:
    """Input bytes of every all-reduce / all-to-all / all-gather issued since ``reset``."""

    def __init__(self) -> None:
        self.sent = {"all_reduce": 0, "all_to_all_single": 0, "all_gather_single": 0}
        for name in self.sent:
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        position = 0 if name == "all_reduce" else 1  # all_reduce(tensor), f(output, input)

        def counted(*args, **kwargs):
            tensor = args[position] if len(args) > position else kwargs["tensor" if position == 0 else "input"]
            self.sent[name] += tensor.numel() * tensor.element_size()
            return original(*args, **kwargs)

        return counted

    def take(self) -> dict[str, int]:
        out = dict(self.sent)
        for name in self.sent:
            self.sent[name] = 0
        return out


def galore_groups(model: nn.Sequential) -> list[dict]:
    """GaLore on the first and last weights (32×16: R = G P; 8×32: R = Pᵀ G), Fira on the middle
    one (sent in full), biases plain."""
    return [
        {"params": [model[0].weight, model[4].weight], "projection": "svd", "rank": 4, "update_proj_gap": GAP, "scale": 0.25},
        {"params": [model[2].weight], "projection": "svd", "rank": 4, "update_proj_gap": GAP, "residual": "fira"},
        {"params": [model[0].bias, model[2].bias, model[4].bias]},
    ]


def train(rank, kind, make_optimizer, steps, *, wire, start=0, bucket_cap_mb=None, load=None, save=None, **hook_options):
    from lowrank.distributed.comm import register_comm_hook

    model = make_model()
    if load is not None:
        model.load_state_dict(torch.load(load, weights_only=True)["model"])
    options = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    ddp = nn.parallel.DistributedDataParallel(model, **options)
    optimizer = make_optimizer(model)
    if load is not None:
        optimizer.load_state_dict(torch.load(load, weights_only=True)["optimizer"])
    stats = register_comm_hook(ddp, kind, optimizer=optimizer, **hook_options)
    losses, measured, details = [], [], []
    wire.take()
    for step in range(start, start + steps):
        x, y = batch(rank, step)
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        measured.append(wire.take())
        details.append(stats.detail_last_step)
    if save is not None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, save)
    return {"params": [p.detach().clone() for p in model.parameters()], "log": list(stats.log), "measured": measured,
            "detail": details, "losses": losses, "sent_full": dict(stats.sent_full), "buckets": stats.buckets_last_step,
            "state": optimizer.state_dict()["state"]}


def worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD)
    from lowrank.distributed.onebit import OneBitAdam
    from lowrank.optim import ProjectedAdamW

    wire = Wire()

    def galore(model):
        return ProjectedAdamW(galore_groups(model), lr=1e-2)

    def adamw(model):
        return ProjectedAdamW(model.parameters(), lr=1e-2)

    def onebit(model):
        return OneBitAdam(model.parameters(), lr=1e-2, freeze_step=FREEZE, weight_decay=0.01)

    results = {
        "none": train(rank, "none", galore, STEPS, wire=wire),
        "projected": train(rank, "projected", galore, STEPS, wire=wire),
        "projected_buckets": train(rank, "projected", galore, STEPS, wire=wire, bucket_cap_mb=0.001),
        "bf16": train(rank, "bf16", adamw, 3, wire=wire),
        "fp16": train(rank, "fp16", adamw, 3, wire=wire),
        "powersgd": train(rank, "powersgd", adamw, 5, wire=wire, matrix_approximation_rank=2, start_powerSGD_iter=2),
        "powersgd_buckets": train(rank, "powersgd", adamw, 5, wire=wire, bucket_cap_mb=0.001, matrix_approximation_rank=2,
                                  start_powerSGD_iter=2),
        "onebit": train(rank, "onebit", onebit, ONEBIT_STEPS, wire=wire),
    }
    saved = f"{out}/onebit_rank{rank}.pt"
    train(rank, "onebit", onebit, RESUME_AT, wire=wire, save=saved)
    results["onebit_resumed"] = train(rank, "onebit", onebit, ONEBIT_STEPS - RESUME_AT, wire=wire, start=RESUME_AT,
                                      load=saved)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    folder = sys.argv[1]
    os.makedirs(folder, exist_ok=True)
    mp.spawn(worker, args=(folder,), nprocs=WORLD)
