"""Pretrain a small LLaMA with low-rank layers in your own training loop.

One process:   python examples/pretrain_llama.py
DDP on CPU:    torchrun --nproc_per_node 2 examples/pretrain_llama.py
               accelerate launch --num_processes 2 --cpu examples/pretrain_llama.py

The recipe is the benchmark paper's (arXiv 2505.22922): every linear layer but the head becomes
``W = s·B A``; every ``--cycle-length`` steps the factors are refactorized (balanced SVD), their
Adam moments reset and the learning rate restarts, all on one clock (``RestartController``). It
uses lowrank's Python API, not the ``lowrank pretrain`` command. At the end it writes a resumable
checkpoint and a dense Hugging Face model that plain transformers loads
(``python examples/generate.py runs/example/model``).
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lowrank
from lowrank.data import build_data
from lowrank.distributed import end_process_group
from lowrank.models import build_model, load_model_config
from lowrank.optim import ProjectedAdamW


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pretrain a small low-rank LLaMA in a plain PyTorch loop.")
    parser.add_argument("--data", default="builtin", help="'builtin' (standard-library docstrings) or a .txt/.jsonl/.parquet file or folder")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train a byte-level BPE on --data)")
    parser.add_argument("--model", default="tiny", help="bundled config (tiny, llama_9m, ...) or a config.json")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cycle-length", type=int, default=50, help="steps between refactorizations")
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", default="runs/example")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # torchrun and `accelerate launch` both set RANK, WORLD_SIZE and LOCAL_RANK for each process.
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    # Packed (batch, seq_len) token batches, this process's share; rank 0 trains the tokenizer.
    data = build_data(args.data, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, tokenizer=args.tokenizer,
                      vocab_size=args.vocab_size, cache_dir=args.out, rank=rank, world_size=world_size,
                      max_valid_tokens=32 * args.seq_len)
    tok = data.tokenizer
    config = load_model_config(args.model, vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    model = build_model(config, seed=args.seed).to(device)  # the same seed on every rank: the same weights
    lowrank.wrap(model, lowrank.LowRankConfig(rank=args.rank, alpha=32, seed=args.seed))
    if rank == 0:
        print(f"{world_size} process(es); {lowrank.count_parameters(model)}")

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = ProjectedAdamW(trainable, lr=args.lr)
    restarts = lowrank.RestartController(model, optimizer, total_steps=args.steps, cycle_length=args.cycle_length,
                                         event="refactorize", reset="changed", warmup_steps=args.steps // 10, rewarmup_steps=2)
    ddp_model = DistributedDataParallel(model) if world_size > 1 else model

    for step in range(1, args.steps + 1):
        batch = next(data.train).to(device)
        loss = ddp_model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        event = restarts.step()  # sets the next step's LR; every cycle: refactorize + reset the factors' moments
        if rank == 0 and (step % 10 == 0 or event):
            note = f"  <- {event.event} of {event.layers} layers, {event.reset_params} moments reset" if event else ""
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {optimizer.param_groups[0]['lr']:.2e}{note}")

    model.eval()
    with torch.no_grad():  # the validation chunks are the same on every rank
        val_loss = sum(model(input_ids=c[None].to(device), labels=c[None].to(device)).loss.item() for c in data.valid) / len(data.valid)
    if rank == 0:
        out = Path(args.out)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "restarts": restarts.state_dict(),
                    "step": args.steps}, out / "checkpoint.pt")
        dense = lowrank.merge_to_dense(model)  # plain nn.Linear layers, same logits
        dense.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        print(f"validation loss {val_loss:.3f}; wrote {out / 'checkpoint.pt'} and the dense model {out / 'model'}")
    # Drop the DDP wrapper first (its reducer holds the process group), then end the group on every
    # rank together: lowrank.distributed.end_process_group says why.
    del ddp_model
    end_process_group(completed=True)


if __name__ == "__main__":
    main()
