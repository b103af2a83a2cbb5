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
VOCAB, SEEN = 64, 32  # the embedding model sees tokens 0..SEEN-1 only: rows SEEN.. never have a gradient
EMBED_STEPS, EMBED_FREEZE = 12, 4
RESET_EVERY, RESET_FREEZE, REFREEZE, RESET_STEPS = 8, 10, 3, 24  # momentum resets at steps 8 and 16


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))


class Bag(nn.Module):
    """Embedding → mean over the sequence → linear: an embedding whose unseen rows get exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(1))


def make_bag(seed: int = 0) -> Bag:
    torch.manual_seed(seed)
    return Bag()


_TABLE = torch.randn(VOCAB, 8, generator=torch.Generator().manual_seed(321))


def bag_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens below ``SEEN`` only, each rank's own; the target is a fixed table's mean over them."""
    gen = torch.Generator().manual_seed(5000 + 1000 * rank + step)
    tokens = torch.randint(0, SEEN, (8, 5), generator=gen)
    return tokens, _TABLE[tokens].mean(1)


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
        self.sent = {"all_reduce": 0, "all_to_all_single": 0, "all_gather_into_tensor": 0, "broadcast": 0}
        for name in self.sent:
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        position = 0 if name in ("all_reduce", "broadcast") else 1  # all_reduce(tensor), f(output, input)

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


def train(rank, kind, make_optimizer, steps, *, wire, start=0, bucket_cap_mb=None, load=None, save=None,
          model_fn=make_model, batch_fn=batch, reset_every=None, **hook_options):
    from lowrank.distributed.comm import register_comm_hook

    model = model_fn()
    if load is not None:
        model.load_state_dict(torch.load(load, weights_only=True)["model"])
    options = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    ddp = nn.parallel.DistributedDataParallel(model, **options)
    optimizer = make_optimizer(model)
    if load is not None:
        optimizer.load_state_dict(torch.load(load, weights_only=True)["optimizer"])
    stats = register_comm_hook(ddp, kind, optimizer=optimizer, **hook_options)
    losses, measured, details, norms = [], [], [], []
    wire.take()
    for step in range(start, start + steps):
        x, y = batch_fn(rank, step)
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        # the global gradient norm a clip would see (max_norm inf: the gradients are left as they are)
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if reset_every and (step + 1) % reset_every == 0:  # as the restart controller does, after the step
            optimizer.reset_momentum()
        losses.append(loss.item())
        measured.append(wire.take())
        details.append(stats.detail_last_step)
    if save is not None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, save)
    return {"params": [p.detach().clone() for p in model.parameters()], "log": list(stats.log), "measured": measured,
            "detail": details, "losses": losses, "norms": norms, "sent_full": dict(stats.sent_full), "buckets": stats.buckets_last_step,
            "state": optimizer.state_dict()["state"]}


def worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD)
    from lowrank.distributed import end_process_group
    from lowrank.distributed.onebit import OneBitAdam
    from lowrank.optim import ProjectedAdamW

    wire = Wire()

    def galore(model):
        return ProjectedAdamW(galore_groups(model), lr=1e-2)

    def adamw(model):
        return ProjectedAdamW(model.parameters(), lr=1e-2)

    def onebit(model):
        return OneBitAdam(model.parameters(), lr=1e-2, freeze_step=FREEZE, weight_decay=0.01)

    def onebit_embedding(model):
        return OneBitAdam(model.parameters(), lr=1e-2, freeze_step=EMBED_FREEZE, weight_decay=0.01)

    def adamw_embedding(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)

    def onebit_resets(model):
        return OneBitAdam(model.parameters(), lr=1e-2, freeze_step=RESET_FREEZE, refreeze_step=REFREEZE)

    def onebit_paper(model):  # the published compressor: the momentum, scaled by its l2 norm
        return OneBitAdam(model.parameters(), lr=1e-2, freeze_step=FREEZE, weight_decay=0.01, onebit_scale="l2",
                          onebit_compress="momentum")

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
        "onebit_paper": train(rank, "onebit", onebit_paper, ONEBIT_STEPS, wire=wire),
        "onebit_embedding": train(rank, "onebit", onebit_embedding, EMBED_STEPS, wire=wire, model_fn=make_bag,
                                  batch_fn=bag_batch),
        "adamw_embedding": train(rank, "none", adamw_embedding, EMBED_STEPS, wire=wire, model_fn=make_bag,
                                 batch_fn=bag_batch),
        "onebit_resets": train(rank, "onebit", onebit_resets, RESET_STEPS, wire=wire, reset_every=RESET_EVERY),
    }
    # Rank 1's SVD returns -U (as valid a basis): with bases broadcast from rank 0 the ranks still agree.
    from lowrank.optim import projection

    svd_basis = projection.svd_basis
    if rank == 1:
        projection.svd_basis = lambda grad, r: -svd_basis(grad, r)
    results["projected_flip"] = train(rank, "projected", galore, STEPS, wire=wire)
    projection.svd_basis = svd_basis
    saved = f"{out}/onebit_rank{rank}.pt"
    train(rank, "onebit", onebit, RESUME_AT, wire=wire, save=saved)
    results["onebit_resumed"] = train(rank, "onebit", onebit, ONEBIT_STEPS - RESUME_AT, wire=wire, start=RESUME_AT,
                                      load=saved)
    torch.save(results, f"{out}/rank{rank}.pt")
    end_process_group(completed=True)


if __name__ == "__main__":
    folder = sys.argv[1]
    os.makedirs(folder, exist_ok=True)
    mp.spawn(worker, args=(folder,), nprocs=WORLD)
