"""The ``lowrank`` command: ``lowrank pretrain | memory | export | quant-eval | quantize``.

User errors (:class:`lowrank.errors.UsageError`, and bad flags) print one line and exit with
code 2, never a traceback. Under ``torchrun`` only rank 0 prints it; every rank exits with 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def pick_device(choice: str):
    """``--device auto | cpu | cuda`` as a ``torch.device``; ``cuda`` without a CUDA device is a UsageError."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


# How long a rank other than 0 waits, after a user error, before it exits (see _let_rank_zero_speak).
_RANK_ZERO_GRACE_S = 10.0


def _let_rank_zero_speak(message: str) -> None:
    """Under torchrun the first rank to exit non-zero makes torchrun kill the others: a rank > 0
    that fails first (rank 0 being slower, e.g. on a busy machine) would kill rank 0 before it
    printed the one line. So a rank > 0 waits; normally rank 0 fails the same way meanwhile and
    torchrun ends this process. If it is still alive after the grace period, the error was its own
    (rank 0 did not meet it): it says so itself."""
    import time

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    time.sleep(_RANK_ZERO_GRACE_S)
    print(f"{message} (rank {os.environ.get('RANK')})", file=sys.stderr)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        if _is_rank_zero():
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from . import pretrain as train

    parser = OneLineParser(prog="lowrank", description="Memory-efficient LLM pretraining.")
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser("pretrain", help="pretrain a causal LM with a method preset",
                                   description="Pretrain a causal LM with a method preset (single process or torchrun DDP).")
    train.add_arguments(pretrain)
    pretrain.set_defaults(handler=train.run_from_args)
    from ..memory import cli as memory_cli

    memory = commands.add_parser("memory", help="estimate (and measure) the training memory of methods",
                                 description="Estimate the training memory of methods on a model, optionally measured against real steps.")
    memory_cli.add_arguments(memory)
    memory.set_defaults(handler=memory_cli.run_from_args)
    from ..integrations import export as export_cli

    export = commands.add_parser("export", help="write a run's model as a plain dense Hugging Face model",
                                 description="Write a run's trained model as a dense Hugging Face model folder (safetensors, "
                                             "config, tokenizer) that transformers loads without lowrank.")
    export_cli.add_arguments(export)
    export.set_defaults(handler=export_cli.run_from_args)
    from . import quant as quant_cli

    quant_eval = commands.add_parser("quant-eval", help="hidden-state kurtosis and perplexity under simulated quantization",
                                     description="Excess kurtosis of the hidden states and validation perplexity in full "
                                                 "precision and under W4/W3/W2 and W4A4/W8A8 simulated quantization.")
    quant_cli.add_quant_eval_arguments(quant_eval)
    quant_eval.set_defaults(handler=quant_cli.run_quant_eval)
    quantize = commands.add_parser("quantize", help="ultra-low-bit PTQ with low-rank retraining (ApiQ, saliency-aware)",
                                   description="Quantize the linear layers to 2/3/4/8 bits with ApiQ-initialised low-rank "
                                               "factors retrained block by block; write a dense Hugging Face model (and, with "
                                               "--peft, a LoRA adapter).")
    quant_cli.add_quantize_arguments(quantize)
    quantize.set_defaults(handler=quant_cli.run_quantize)
    return parser


# Import-time chatter of optional libraries that transformers pulls in when they are installed
# (torchao logs every CUDA kernel library it cannot load on a CPU machine; torch warns about
# torchao's enum registrations; bitsandbytes misses an optional CPU kernel package): not the user's concern, and it would bury our one-line errors.
_QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes")


def main(argv: list[str] | None = None) -> int:
    import logging

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # a bad flag (one line already printed), or --help
        return int(exit_.code or 0)
    try:
        args.handler(args)
    except UsageError as error:
        message = f"lowrank {args.command}: error: {' '.join(str(error).split())}"
        if _is_rank_zero():
            print(message, file=sys.stderr)
        elif argv is None:  # this process is the command (python -m lowrank, torchrun): it exits next
            _let_rank_zero_speak(message)
        return 2
    except KeyboardInterrupt:
        print(f"lowrank {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
