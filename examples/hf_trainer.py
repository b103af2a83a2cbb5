"""Pretrain a tiny LLaMA with the Hugging Face ``Trainer`` plus lowrank: a few added lines.

    python examples/hf_trainer.py                      # about 30 s on 2 CPU cores
    python examples/hf_trainer.py --resume             # continue from the last Trainer checkpoint

What lowrank adds to an ordinary Trainer script (marked ``# lowrank`` below): wrap the model with a
method preset, give the Trainer the preset's optimizer, and attach ``LowRankCallback``, which runs
the refactorization + momentum reset every ``--cycle-length`` steps and the jagged-cosine learning
rate on the Trainer's own step counter (saved in its checkpoints, so ``--resume`` continues it).
The data is local text: ``--data`` (a .txt/.jsonl/.parquet file or folder), or by default a small
offline corpus cut from lowrank's builtin one (standard-library docstrings). At the end the model
is saved dense, for plain transformers: ``python examples/generate.py runs/hf_trainer/model``.
"""

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

import lowrank
from lowrank.data import build_data, builtin_documents
from lowrank.integrations import LowRankCallback, optimizer_cls_and_kwargs
from lowrank.methods import apply_method, load_method
from lowrank.models import build_model, load_model_config


class Chunks(torch.utils.data.Dataset):
    """Packed token chunks as the Trainer's default collator wants them (the model shifts labels)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def small_corpus(folder: Path, documents: int = 200) -> Path:
    """``train.txt`` / ``valid.txt`` from the first builtin documents (offline, deterministic)."""
    docs = [text for _, text in builtin_documents(cache_dir=folder)[:documents]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n\n".join(d for i, d in enumerate(docs) if i % 10) + "\n")
    (folder / "valid.txt").write_text("\n\n".join(d for i, d in enumerate(docs) if i % 10 == 0) + "\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Trainer pretraining of a tiny low-rank LLaMA.")
    parser.add_argument("--data", default=None, help="local text file or folder (default: a small builtin corpus)")
    parser.add_argument("--method", default="low_rank_restarts", help="lowrank method preset")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cycle-length", type=int, default=50)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--out", default="runs/hf_trainer")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    args = parser.parse_args()
    out = Path(args.out)

    data = build_data(args.data or str(small_corpus(out / "corpus")), seq_len=args.seq_len, batch_size=1,
                      vocab_size=args.vocab_size, cache_dir=out, max_valid_tokens=64 * args.seq_len)
    tok = data.tokenizer
    train = torch.from_numpy(data.train.chunk(np.arange(data.train.num_chunks)))
    config = load_model_config("tiny", vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    model = build_model(config, seed=0)

    method = load_method(args.method, {"lowrank.rank": args.rank, "restarts.cycle_length": args.cycle_length,
                                       "restarts.rewarmup_steps": 5})  # lowrank
    apply_method(model, method)  # lowrank: linear layers -> s·B A
    print(f"{args.method}: {lowrank.count_parameters(model)}")

    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=8, logging_steps=20,
        save_steps=100, eval_strategy="steps", eval_steps=100, per_device_eval_batch_size=16,
        max_grad_norm=method.training["grad_clip"], dataloader_pin_memory=torch.cuda.is_available(), report_to="none", disable_tqdm=True, seed=0,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=Chunks(train), eval_dataset=Chunks(data.valid),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(method),  # lowrank: the preset's optimizer
        callbacks=[callback := LowRankCallback(method)],  # lowrank: restarts + jagged-cosine LR
    )
    trainer.train(resume_from_checkpoint=args.resume or None)
    val_loss = trainer.evaluate()["eval_loss"]
    print(f"restarts at steps {[e.step for e in callback.events]}; validation loss {val_loss:.3f} (ppl {math.exp(val_loss):.1f})")
    lowrank.merge_to_dense(model).save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    print(f"dense model for plain transformers: {out / 'model'}")


if __name__ == "__main__":
    main()
