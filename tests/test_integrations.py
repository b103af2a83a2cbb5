"""Integrations: the Trainer callback (events, momentum, LR, resume), export to a plain model that
loads without lowrank, PEFT adapters, and the example script under accelerate / torchrun."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, load_model
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import lowrank
from lowrank import LowRankConfig, cli
from lowrank.data import train_bpe_tokenizer
from lowrank.integrations import (
    LowRankCallback,
    create_optimizer_and_scheduler,
    dense_base_model,
    load_peft_adapter,
    optimizer_cls_and_kwargs,
    save_peft_adapter,
)
from lowrank.methods import Method, apply_method, load_method
from lowrank.models import build_model
from lowrank.restarts import jagged_cosine
from lowrank.train import TrainConfig, pretrain
from test_wrap import PATTERNS, perturb_factors
from tiny_models import VOCAB, build, logits, tokens

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------- Trainer


def counting_data(n=64, length=16, seed=0):
    """Sequences that count up (mod VOCAB) from a random start: learnable within a few steps."""
    starts = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids, "labels": ids} for ids in (starts[:, None] + torch.arange(length)) % VOCAB]


def restarts_method(**overrides):
    return load_method("low_rank_restarts", {"lowrank.rank": 4, "restarts.cycle_length": 3, "restarts.rewarmup_steps": 2,
                                             "optimizer.lr": 2e-2, **overrides})


def training_args(out, **kwargs):
    options = dict(output_dir=str(out), max_steps=9, per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                   report_to="none", use_cpu=True, disable_tqdm=True, seed=0, dataloader_pin_memory=False)
    options.update(kwargs)
    return TrainingArguments(**options)


def logged(trainer, key):
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


class MomentumProbe(TrainerCallback):
    """After LowRankCallback's on_step_end: is each parameter's Adam state zero?"""

    def __init__(self, model):
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.zero: dict[int, dict[str, bool]] = {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        inner = optimizer.optimizer  # the Trainer hands callbacks accelerate's AcceleratedOptimizer
        self.zero[state.global_step] = {
            self.names[id(p)]: bool(inner.state[p]["exp_avg"].eq(0).all() and inner.state[p]["exp_avg_sq"].eq(0).all())
            for group in inner.param_groups for p in group["params"]
        }


def test_trainer_callback_events_momentum_and_schedule(tmp_path):
    method = restarts_method()
    model = apply_method(build("llama").train(), method)
    callback, probe = LowRankCallback(method), MomentumProbe(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, gradient_accumulation_steps=2), train_dataset=counting_data(),
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(method), callbacks=[callback, probe])
    trainer.train()

    losses = list(logged(trainer, "loss").values())
    assert len(losses) == 9 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    # One event per cycle of optimizer steps (on_step_end fires once per 2 accumulated micro-batches).
    assert [(e.step, e.event) for e in callback.events] == [(3, "refactorize"), (6, "refactorize")]
    factors = {f"{name}.{p}" for name in lowrank.lowrank_layers(model) for p in ("A", "B")}
    for step, zero in probe.zero.items():
        changed = {name for name, is_zero in zero.items() if is_zero}
        assert changed == (factors if step in (3, 6) else set()), step
    # The LR the Trainer logged for step k is the controller's jagged cosine at k - 1 (warm-up,
    # decay, and a 2-step re-warm-up after each restart): one clock. It logs the first group's, the
    # factors' (lr × the preset's matrix_lr_ratio).
    peak = method.optimizer.lr * method.optimizer.matrix_lr_ratio
    expected = [peak * jagged_cosine(k, total_steps=9, warmup_steps=1, min_lr_ratio=0.1, cycle_length=3, rewarmup_steps=2)
                for k in range(9)]
    assert list(logged(trainer, "learning_rate").values()) == pytest.approx(expected)
    assert expected[3] < expected[2] and expected[6] < expected[5]  # the restarts are visible


@pytest.mark.parametrize("restore", [False, True], ids=["plain", "restore_callback_states"])
def test_trainer_resume_continues_the_clock(restore, tmp_path):
    """A run resumed from its step-4 checkpoint takes the same steps as the uninterrupted one,
    whether the Trainer rebuilds the callback from trainer_state.json or keeps ours."""

    def run(out, resume=None):
        method = restarts_method()
        model = apply_method(build("llama").train(), method)
        args = training_args(out, max_steps=8, save_strategy="steps", save_steps=4, restore_callback_states_from_checkpoint=restore)
        trainer = Trainer(model=model, args=args, train_dataset=counting_data(), callbacks=[LowRankCallback(method)],
                          optimizers=create_optimizer_and_scheduler(model, method, total_steps=8))
        trainer.train(resume_from_checkpoint=resume)
        callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, LowRankCallback))
        return trainer, callback, model

    full, full_callback, full_model = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-4"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["LowRankCallback"]
    assert saved["attributes"]["clock"] == {"num_steps": 4, "num_restarts": 1}
    # What the Trainer resumes from loads with weights_only=True, as transformers does.
    torch.load(checkpoint / "optimizer.pt", weights_only=True)
    torch.load(checkpoint / "scheduler.pt", weights_only=True)

    resumed, resumed_callback, resumed_model = run(tmp_path / "resumed", resume=str(checkpoint))
    assert [e.step for e in full_callback.events] == [3, 6] and [e.step for e in resumed_callback.events] == [6]
    for key in ("learning_rate", "loss"):
        tail = {step: value for step, value in logged(full, key).items() if step > 4}
        assert {step: logged(resumed, key)[step] for step in tail} == pytest.approx(tail, rel=1e-6)
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_callback_on_a_model_that_was_never_wrapped(tmp_path):
    method = restarts_method()
    with pytest.raises(ValueError, match=r"no LowRankLinear layers: call lowrank.wrap"):
        Trainer(model=build("llama"), args=training_args(tmp_path), train_dataset=counting_data(), callbacks=[LowRankCallback(method)])
    with pytest.raises(ValueError, match=r"lowrank.wrap"):
        optimizer_cls_and_kwargs(method)[0]()(build("llama"), **optimizer_cls_and_kwargs(method)[1])
    # A dense method whose restarts only reset every moment (SPAM) is legitimate on a dense model.
    spam = load_method("spam", {"restarts.cycle_length": 2})
    model = build("llama").train()
    callback = LowRankCallback(spam)
    Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=counting_data(),
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(spam), callbacks=[callback]).train()
    assert [(e.step, e.event, e.reset_params) for e in callback.events] == [(2, "none", len(list(model.parameters())))]


# ---------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Two short `lowrank pretrain` runs: ReLoRA (dense warm start, then a merge) and SLTrain (sparse part)."""
    root = tmp_path_factory.mktemp("runs")
    common = dict(model="tiny", data=corpus["data"], tokenizer=corpus["tokenizer"], rank=8, batch_size=2, seq_len=32,
                  max_steps=6, eval_every=0, eval_tokens=1024, progress=False, plot=False)
    pretrain(TrainConfig(method="relora", out=str(root / "relora"), cycle_length=2,
                         overrides={"lowrank.warm_start_steps": 2, "restarts.rewarmup_steps": 1}, **common))
    pretrain(TrainConfig(method="sltrain", out=str(root / "sltrain"), **common))
    return root


def trained_logits(run_dir, ids):
    """The trained low-rank model, rebuilt here from the checkpoint (independently of export's code)."""
    checkpoint = sorted((Path(run_dir) / "checkpoints").glob("step_*"))[-1]
    meta = json.loads((checkpoint / "meta.json").read_text())
    config = dict(meta["model_config"])
    model = build_model(AutoConfig.for_model(config.pop("model_type"), **config))
    apply_method(model, Method(**meta["method"]))
    load_model(model, str(checkpoint / "model.safetensors"), strict=True)
    assert lowrank.lowrank_layers(model)
    return logits(model.eval(), ids)


# Loads the exported folder in a Python where `import lowrank` fails, and saves its logits.
WITHOUT_LOWRANK = r"""
import sys

class BlockLowrank:
    def find_spec(self, name, path=None, target=None):
        if name == "lowrank" or name.startswith("lowrank."):
            raise ImportError("lowrank is blocked in this interpreter")

sys.meta_path.insert(0, BlockLowrank())
try:
    import lowrank
except ImportError:
    pass
else:
    raise SystemExit("lowrank is importable")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = torch.load(ids_file)
assert len(tokenizer) == model.config.vocab_size
with torch.no_grad():
    torch.save(model(ids).logits, out_file)
assert not [m for m in sys.modules if m.split(".")[0] == "lowrank"]
"""


@pytest.mark.parametrize("method", ["relora", "sltrain"])
def test_export_loads_in_plain_transformers_with_the_same_logits(method, runs, tmp_path, capsys):
    out = tmp_path / "exported"
    assert cli.main(["export", str(runs / method), "--out", str(out)]) == 0
    assert "exported step 6" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and not [k for k in config if "lowrank" in k.lower()]
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not [k for k in load_file(out / "model.safetensors") if k.endswith((".A", ".B", "base_weight", "sparse_values"))]

    ids = torch.randint(0, config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", WITHOUT_LOWRANK, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), trained_logits(runs / method, ids), rtol=1e-4, atol=1e-5)


def test_export_bad_input_is_one_line_with_exit_code_2(runs, tmp_path, capsys):
    def export(*args):
        code = cli.main(["export", *map(str, args)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    (tmp_path / "empty").mkdir()
    assert "holds no checkpoint" in export(tmp_path / "empty", "--out", tmp_path / "x")
    assert "no such folder" in export(tmp_path / "missing", "--out", tmp_path / "x")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert "is a transformers Trainer checkpoint" in export(tmp_path / "checkpoint-4", "--out", tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert "exists and is not empty" in export(runs / "sltrain", "--out", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    other = train_bpe_tokenizer(["a tiny corpus for another tokenizer"] * 20, vocab_size=300)
    other.save_pretrained(tmp_path / "other_tokenizer")
    err = export(runs / "sltrain", "--out", tmp_path / "y", "--tokenizer", tmp_path / "other_tokenizer")
    assert f"has {len(other)} tokens but the model's embedding has" in err and not (tmp_path / "y").exists()
    # --overwrite replaces a non-empty folder; a checkpoint folder can be named directly.
    checkpoint = sorted((runs / "sltrain" / "checkpoints").glob("step_*"))[-1]
    assert cli.main(["export", str(checkpoint), "--out", str(tmp_path / "busy"), "--overwrite"]) == 0
    assert not (tmp_path / "busy" / "keep.txt").exists() and (tmp_path / "busy" / "config.json").is_file()


# ---------------------------------------------------------------------- PEFT


def relora_model(arch="llama", **config):
    """A ReLoRA-wrapped model after one merge, with nonzero factors: base and adapter both matter."""
    model = lowrank.wrap(build(arch), LowRankConfig(keep_base=True, **config))
    perturb_factors(model, seed=0)
    lowrank.merge(model)
    perturb_factors(model, seed=1)
    return model.eval()


@pytest.mark.parametrize("arch, config", [("llama", {"rank": 4, "alpha": 8}), ("llama", {"rank_ratio": 0.5}), ("gpt2", {"rank": 4})],
                         ids=["llama-rank", "llama-per-layer-ranks", "gpt2-conv1d"])
def test_peft_adapter_round_trip(arch, config, tmp_path):
    model = relora_model(arch, **config)
    expected = logits(model, tokens())
    dense_base_model(model).save_pretrained(tmp_path / "base")
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))

    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and set(adapter_config["target_modules"]) == set(lowrank.lowrank_layers(model))
    assert bool(adapter_config["rank_pattern"]) == ("rank_ratio" in config)
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    first = next(iter(lowrank.lowrank_layers(model)))
    assert f"base_model.model.{first}.lora_A.weight" in keys and f"base_model.model.{first}.lora_B.weight" in keys

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, tokens()), expected)

    fresh = lowrank.wrap(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), LowRankConfig(keep_base=True, seed=7, **config))
    load_peft_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh.eval(), tokens()), expected)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_adapter_targets_are_the_modules_peft_selects(pattern, tmp_path):
    """Wrapping with a pattern and saving an adapter touches exactly the modules a LoRA adapter
    with that pattern would (PEFT's matcher), and PEFT loads our adapter onto exactly those."""
    model = relora_model(rank=2, target_modules=copy.deepcopy(pattern))
    dense_base_model(model).save_pretrained(tmp_path / "base")
    save_peft_adapter(model, tmp_path / "adapter")
    theirs = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=copy.deepcopy(pattern)))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")

    def lora_names(m):
        return {n.removeprefix("base_model.model.") for n, module in m.named_modules() if isinstance(module, LoraLayer)}

    assert set(lowrank.lowrank_layers(model)) == lora_names(theirs) == lora_names(loaded)


def test_adapter_refuses_layers_it_cannot_represent(tmp_path):
    with pytest.raises(ValueError, match=r"has no frozen base"):
        save_peft_adapter(lowrank.wrap(build("llama"), LowRankConfig(rank=2)), tmp_path)
    with pytest.raises(ValueError, match=r"sparse part"):
        save_peft_adapter(lowrank.wrap(build("llama"), LowRankConfig(rank=2, keep_base=True, sparse_density=0.05)), tmp_path)
    model = relora_model(rank=4)
    save_peft_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"do not fit"):
        load_peft_adapter(relora_model(rank=2), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"differ from the wrapped layers"):
        load_peft_adapter(relora_model(rank=4, target_modules=["q_proj"]), tmp_path / "adapter")


# ---------------------------------------------------------------------- launchers


LAUNCHERS = {
    # accelerate's --cpu starts several processes only through MPI; --multi_gpu uses torch's
    # launcher, which on a machine without GPUs runs CPU processes (the script picks gloo).
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_example_runs_under_two_cpu_processes(launcher, corpus, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, *LAUNCHERS[launcher], str(ROOT / "examples" / "pretrain_llama.py"), "--data", corpus["data"],
               "--tokenizer", corpus["tokenizer"], "--steps", "6", "--cycle-length", "3", "--rank", "4", "--batch-size", "2",
               "--seq-len", "32", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "refactorize of 14 layers" in result.stdout, result.stdout
    assert (out / "model" / "config.json").is_file() and (out / "checkpoint.pt").is_file()


def test_callback_refuses_the_optimizer_step_inside_backward(tmp_path):
    """The Trainer owns backward and optimizer.step(): a layerwise preset is refused with the way out."""
    method = restarts_method().with_overrides({"training.layerwise_step": True})
    with pytest.raises(ValueError, match=r"training.layerwise_step=true: .* lowrank pretrain --layerwise-step"):
        Trainer(model=build("llama"), args=training_args(tmp_path), train_dataset=counting_data(), callbacks=[LowRankCallback(method)])
