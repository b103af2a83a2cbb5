"""What the comparison runs: suites (model, data shape, budget, event clock, sweep plan) and
contenders (our presets, or a peer optimizer through its own package).

Data only; ``plan.py`` decides which runs a suite needs and ``compare.py`` runs them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Suite", "Contender", "SUITES", "CONTENDERS", "PLAN_FIELDS"]


@dataclass(frozen=True)
class Suite:
    """One benchmark configuration.

    Training: ``model``, ``vocab_size`` (BPE trained on the corpus), ``seq_len``, ``batch_size``,
    ``grad_accum``, ``steps``; evaluation every ``eval_every`` steps on ``eval_tokens`` tokens
    spread over the validation split; every periodic event (refactorization, merge, SPAM reset,
    projector refresh) every ``cycle`` steps, factors and projections at ``rank``.

    Plan (``PLAN_FIELDS``; they choose runs and are not part of any run's settings):

    * ``contenders``: the default contender list.
    * ``sweep``: learning-rate factors around each contender's published (or preset) value;
      ``sweep_all`` sweeps every contender, otherwise only those marked ``sweep=True``.
      When the best lies at an edge the grid grows by one point beyond it (up to ``max_extend``
      times per side).
    * ``ratio_sweep``: its step (2 for ``(0.5, 2.0)``) is that of the search over the dense and
      the hidden matrices' learning rates (``optimizer.matrix_lr_ratio``) from the best
      learning rate, for contenders with such a split (``plan._split_search``), except those in
      ``no_ratio_sweep`` (kept at ratio 1). ``split_moves``: how many times that search may move
      to a better neighbour (and try the new point's neighbours); 6 lets it walk from ratio 1 to
      ratio 1/64 or a dense lr 64× the sweep's best, beyond anything cpu-long has needed (AdamW's
      split needed more than the first cap of 3: its best lay on the edge at 3 moves).
    * ``seeds``: the first is the sweep seed; the best setting of every contender is re-run
      with the others.
    * ``ablation``: contenders run at ``ablation_base``'s best setting (learning rate and ratio),
      with the same seeds.

    ``warm_start_fraction``: ReLoRA-style presets (a frozen base) train the dense model for this
    fraction of the steps first, as ReLoRA's paper does. ``save_every``: checkpoint interval, so
    an interrupted run continues from its last checkpoint. ``keep_checkpoints``: keep each run's
    final checkpoint (for evaluations after training, e.g. ``lowrank quant-eval``).
    """

    model: str
    vocab_size: int
    seq_len: int
    batch_size: int
    steps: int
    cycle: int
    rank: int
    eval_every: int
    eval_tokens: int
    device: str
    precision: str
    grad_accum: int = 1
    warm_start_fraction: float = 0.0
    save_every: int = 0
    note: str = ""
    contenders: tuple[str, ...] = ()
    sweep: tuple[float, ...] = (0.5, 1.0, 2.0)
    sweep_all: bool = False
    max_extend: int = 1
    ratio_sweep: tuple[float, ...] = ()
    no_ratio_sweep: tuple[str, ...] = ()
    split_moves: int = 6
    seeds: tuple[int, ...] = (0,)
    ablation: tuple[str, ...] = ()
    ablation_base: str | None = None
    keep_checkpoints: bool = False

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len * self.grad_accum


PLAN_FIELDS = ("note", "contenders", "sweep", "sweep_all", "max_extend", "ratio_sweep", "no_ratio_sweep", "split_moves",
               "seeds", "ablation", "ablation_base", "save_every", "keep_checkpoints")
"""Suite fields that decide which runs exist, not how one run trains."""


@dataclass(frozen=True)
class Contender:
    """A preset of ours, or a peer optimizer on the dense model (``preset="full_rank"``).

    ``lr``: the published value the sweep centres on (``None``: the preset's own). ``sweep``:
    swept even in suites that sweep only some contenders. ``cycle``: this contender's own event
    period instead of the suite's (the ablation's period variants). ``overrides``: extra preset
    keys (``(("quant.weights", "int4"),)``: the same preset trained in 4 bits). ``precision``:
    this contender's own (``"bf16-mixed"``) instead of the suite's.
    """

    preset: str
    peer: str | None = None
    lr: float | None = None
    sweep: bool = False
    peer_scale: float | None = None
    cycle: int | None = None
    source: str = ""
    overrides: tuple[tuple[str, Any], ...] = ()
    precision: str | None = None

    def definition(self) -> dict[str, Any]:
        """The fields that define the contender, for a run's settings hash: the later-added
        ``overrides`` and ``precision`` only when set, so results of earlier contenders stay valid."""
        data = asdict(self)
        for key in ("overrides", "precision"):
            if not data[key]:
                data.pop(key)
        return data


CONTENDERS = {
    "adamw": Contender("full_rank", peer="adamw", lr=1e-3, source="GaLore paper, full-rank 60M"),
    "galore-torch": Contender("full_rank", peer="galore-torch", lr=1e-2, peer_scale=0.25, source="GaLore paper, 60M"),
    "fira": Contender("full_rank", peer="fira", lr=1e-2, peer_scale=0.25, source="Fira paper, 60M"),
    "apollo-torch": Contender("full_rank", peer="apollo-torch", lr=1e-2, peer_scale=1.0, source="APOLLO paper, 60M"),
    "adamw8bit": Contender("full_rank", peer="adamw8bit", lr=1e-3, source="AdamW's (8-bit Adam is a drop-in)"),
    "adam-mini": Contender("full_rank", peer="adam-mini", lr=1e-3, source="AdamW's (Adam-mini recommends AdamW's lr)"),
    "low_rank": Contender("low_rank", lr=1.5e-3, source="benchmark paper script"),
    "low_rank_restarts": Contender("low_rank_restarts", lr=1.5e-3, source="benchmark paper"),
    "relora": Contender("relora", lr=1e-3, source="ReLoRA paper"),
    "sltrain": Contender("sltrain", lr=3e-3, source="SLTrain paper"),
    "galore": Contender("galore", lr=1e-2, source="GaLore paper (our implementation)"),
    "spam": Contender("spam", lr=1e-3, source="SPAM paper"),
    "lowrank_sparse": Contender("lowrank_sparse", lr=1.5e-3, sweep=True, source="ours: no published value, swept"),
    # The benchmark paper's ablation (section 5): each technique alone, and the combination at
    # other periods. Run at low_rank's best setting so that only the technique differs.
    "low_rank_refactorize": Contender("low_rank_refactorize", lr=1.5e-3, source="ablation: refactorization only"),
    "low_rank_reset": Contender("low_rank_reset", lr=1.5e-3, source="ablation: momentum reset only"),
    "low_rank_restarts@100": Contender("low_rank_restarts", lr=1.5e-3, cycle=100, source="ablation: period 100"),
    "low_rank_restarts@400": Contender("low_rank_restarts", lr=1.5e-3, cycle=400, source="ablation: period 400"),
    # Remedies for the sign(g)-sized first Adam updates after a reset (benchmarks/diagnose_restarts.py):
    # keep v and reset only m (its uncorrected rebuild is a built-in ramp), or SPAM's update warm-up.
    "low_rank_restarts-first": Contender("low_rank_restarts", lr=1.5e-3, overrides=(("restarts.reset_moments", "first"),),
                                         source="remedy: reset the first moment only"),
    # ...or reset m and carry v into the refactorized coordinates (lowrank.optim.rotation), so v is neither
    # stale (-first keeps it in the old ones) nor rebuilt from zero.
    "low_rank_restarts-rotate": Contender("low_rank_restarts", lr=1.5e-3,
                                          overrides=(("restarts.reset_moments", "first"), ("restarts.rotate_moments", True)),
                                          source="remedy: reset m, rotate v into the new basis"),
    "low_rank_restarts-warmup": Contender("low_rank_restarts", lr=1.5e-3, overrides=(("optimizer.matrix.reset_warmup", 10),),
                                          source="remedy: post-reset update warm-up, 10 steps"),
    # Twice the suite's rank (r/d = 1/2 on cpu-long): whether the rank is what keeps the low-rank family
    # behind the methods that update whole matrices (AdamW with the split, Fira). alpha doubles with it so
    # that s = alpha / r stays the suite's 0.5 (at alpha 32, s halves: 33.23 against rank 64's 31.73).
    "low_rank@r128": Contender("low_rank", lr=1.5e-3, overrides=(("lowrank.rank", 128), ("lowrank.alpha", 64)),
                               source="ablation: rank 128, same scale s"),
    # The fair full-rank baseline: the hidden matrices in a group of their own at lr × matrix_lr_ratio
    # (swept), embeddings / head / norms at lr — the split the low-rank family gets.
    "adamw-split": Contender("full_rank", lr=1e-3, overrides=(("optimizer.name", "projected_adamw"),
                                                              ("optimizer.target_modules", "all-linear")),
                             source="AdamW's, with the matrix/dense lr split"),
    "stable_spam": Contender("stable_spam", lr=1e-3, source="Stable-SPAM paper"),
    # 4-bit training (Stable-SPAM's INT4: weights asymmetric per group of 256, activations per group
    # of 64 with stochastic rounding and the top-2 of each group in full precision; the quant section).
    "adamw-bf16": Contender("full_rank", peer="adamw", lr=1e-3, precision="bf16-mixed", source="AdamW's, bf16 autocast"),
    "adamw-int4": Contender("full_rank", peer="adamw", lr=1e-3, overrides=(("quant.weights", "int4"),),
                            source="AdamW's, INT4 weights and activations"),
    "spam-int4": Contender("spam", lr=1e-3, overrides=(("quant.weights", "int4"),), source="SPAM paper, INT4"),
    "stable_spam-int4": Contender("stable_spam", lr=1e-3, overrides=(("quant.weights", "int4"),), source="Stable-SPAM paper, INT4"),
    "low_rank_restarts-int4": Contender("low_rank_restarts", lr=1.5e-3, overrides=(("quant.weights", "int4"),),
                                        source="benchmark paper, INT4"),
    "lowrank_sparse-int4": Contender("lowrank_sparse", lr=1.5e-3, overrides=(("quant.weights", "int4"),), source="ours, INT4"),
    # 8-bit optimizer moments (state_bits) against the same preset in 32 bits.
    "adamw-ours": Contender("full_rank", lr=1e-3, overrides=(("optimizer.name", "projected_adamw"),),
                            source="AdamW's: ProjectedAdamW with every option off"),
    "adamw-ours-8bit": Contender("full_rank", lr=1e-3, overrides=(("optimizer.name", "projected_adamw"),
                                                                  ("optimizer.matrix.state_bits", 8), ("optimizer.other.state_bits", 8)),
                                 source="AdamW's, 8-bit moments"),
    "low_rank-8bit": Contender("low_rank", lr=1.5e-3, overrides=(("optimizer.matrix.state_bits", 8), ("optimizer.other.state_bits", 8)),
                               source="benchmark paper script, 8-bit moments"),
    "lowrank_sparse_8bit": Contender("lowrank_sparse_8bit", lr=1.5e-3, sweep=True, source="ours, 8-bit moments"),
    # bf16 parameter storage (lowrank.precision): stochastic against round-to-nearest write-back,
    # each beside the same preset in fp32 at the same learning rate, its best on cpu-long so far
    # (lowrank_sparse: 3e-3, 32.46, against 35.42 at its preset's 1.5e-3; its own fp32 entry here).
    "lowrank_sparse-fp32": Contender("lowrank_sparse", lr=3e-3, source="ours, at its best cpu-long lr"),
    **{f"{name}-bf16{suffix}": Contender(preset, lr=lr, overrides=(*extra, ("training.param_dtype", "bf16"),
                                                                   ("training.bf16_rounding", rounding)),
                                         source=f"{source}, bf16 storage, {rounding} rounding")
       for name, preset, lr, extra, source in (
           ("adamw-ours", "full_rank", 1e-3, (("optimizer.name", "projected_adamw"),), "AdamW's"),
           ("low_rank_restarts", "low_rank_restarts", 1.5e-3, (), "benchmark paper"),
           ("lowrank_sparse", "lowrank_sparse", 3e-3, (), "ours"))
       for suffix, rounding in (("", "stochastic"), ("-nearest", "nearest"))},
    # Outlier-Safe Pre-Training and Muon.
    "muon": Contender("muon", lr=1e-3, source="Moonlight: AdamW's lr with the matched-RMS scaling"),
    "osp": Contender("osp", lr=1e-3, source="OSP paper (Muon as above)"),
    "low_rank_muon": Contender("low_rank_muon", lr=1.5e-3, source="ours: the low-rank lr"),
}

_CPU_SMALL_CONTENDERS = ("adamw", "galore-torch", "fira", "apollo-torch", "adamw8bit", "adam-mini", "low_rank",
                         "low_rank_restarts", "relora", "sltrain", "galore", "spam", "lowrank_sparse")

SUITES = {
    # Seconds per contender: exercises every code path (tests use it), measures nothing.
    "smoke": Suite(model="tiny", vocab_size=512, seq_len=32, batch_size=4, steps=8, cycle=4, rank=8,
                   eval_every=4, eval_tokens=1024, device="cpu", precision="fp32", note="tiny model, smoke test only",
                   contenders=_CPU_SMALL_CONTENDERS),
    # ~17M parameters (LLaMA-35M shape, vocabulary 8192): 160 steps × 1024 tokens per contender,
    # 15 runs in about 45 minutes on 2 CPU cores. Early training only: the quick check.
    "cpu-small": Suite(model="llama_35m", vocab_size=8192, seq_len=128, batch_size=8, steps=160, cycle=40, rank=96,
                       eval_every=40, eval_tokens=16384, device="cpu", precision="fp32",
                       note="LLaMA-35M shape (hidden 384, 6 layers) with an 8192-token BPE: 16.9M parameters",
                       contenders=_CPU_SMALL_CONTENDERS),
    # The evidence suite: 2,000 steps and 2.05M tokens per run, events every 200 steps as published,
    # every contender swept, the low-rank family's factor/dense lr ratio swept, 3 seeds of each best,
    # and the benchmark paper's ablation. LLaMA-20M shape with a 4096-token BPE: 5.3M parameters, of
    # which 3.2M are in the decoder layers and 2.1M in the embedding and head (the 130M+ models'
    # proportion); rank 64 = hidden / 4, the papers' r/d. One thread per run: ~12 min for AdamW,
    # ~8 for low-rank on this machine's cores.
    "cpu-long": Suite(model="llama_20m", vocab_size=4096, seq_len=128, batch_size=8, steps=2000, cycle=200, rank=64,
                      eval_every=200, eval_tokens=65536, device="cpu", precision="fp32", warm_start_fraction=0.25,
                      save_every=250,
                      note="LLaMA-20M shape (hidden 256, 4 layers) with a 4096-token BPE: 5.3M parameters, 3.2M of them in "
                           "the decoder layers",
                      contenders=("adamw", "galore-torch", "fira", "low_rank", "low_rank_restarts", "lowrank_sparse", "relora",
                                  "sltrain", "adamw-split", "spam", "stable_spam"),
                      # relora and sltrain at ratio 1 (issue 21: their preset settings with 3 seeds suffice);
                      # SPAM and Stable-SPAM have one lr anyway (compare.ONE_LR_PRESETS)
                      sweep_all=True, ratio_sweep=(0.5, 2.0), no_ratio_sweep=("relora", "sltrain"), seeds=(0, 1, 2),
                      ablation=("low_rank_refactorize", "low_rank_reset", "low_rank_restarts", "low_rank_restarts@100",
                                "low_rank_restarts@400", "low_rank_restarts-first", "low_rank_restarts-warmup",
                                "low_rank_restarts-rotate", "low_rank@r128"),
                      ablation_base="low_rank"),
    # The seed papers' low-bit and quantization-readiness claims on cpu-long's model at a shorter
    # budget (600 steps, 614k tokens per run): 4-bit training at 1×/2×/4× each lr (the Stable-SPAM
    # abstract's claim is about stability at higher learning rates), 8-bit moments against 32-bit,
    # and Muon / OSP models kept for lowrank quant-eval and quantize (benchmarks/bench_osp.py).
    "cpu-int4": Suite(model="llama_20m", vocab_size=4096, seq_len=128, batch_size=8, steps=600, cycle=200, rank=64,
                      eval_every=100, eval_tokens=65536, device="cpu", precision="fp32", save_every=200,
                      note="cpu-long's model (LLaMA-20M shape, 4096-token BPE) for 600 steps",
                      contenders=("adamw", "adamw-bf16", "adamw-int4", "spam-int4", "stable_spam-int4",
                                  "low_rank_restarts-int4", "lowrank_sparse-int4"),
                      sweep=(1.0, 2.0, 4.0), sweep_all=True, max_extend=0),
    "cpu-8bit": Suite(model="llama_20m", vocab_size=4096, seq_len=128, batch_size=8, steps=600, cycle=200, rank=64,
                      eval_every=100, eval_tokens=65536, device="cpu", precision="fp32", save_every=200,
                      note="cpu-long's model (LLaMA-20M shape, 4096-token BPE) for 600 steps",
                      contenders=("adamw-ours", "adamw-ours-8bit", "low_rank", "low_rank-8bit", "lowrank_sparse",
                                  "lowrank_sparse_8bit")),
    "cpu-bf16": Suite(model="llama_20m", vocab_size=4096, seq_len=128, batch_size=8, steps=600, cycle=200, rank=64,
                      eval_every=100, eval_tokens=65536, device="cpu", precision="fp32", save_every=200,
                      note="cpu-long's model (LLaMA-20M shape, 4096-token BPE) for 600 steps",
                      contenders=("adamw-ours", "adamw-ours-bf16", "adamw-ours-bf16-nearest",
                                  "low_rank_restarts", "low_rank_restarts-bf16", "low_rank_restarts-bf16-nearest",
                                  "lowrank_sparse-fp32", "lowrank_sparse-bf16", "lowrank_sparse-bf16-nearest"),
                      sweep=(1.0,)),
    "cpu-osp": Suite(model="llama_20m", vocab_size=4096, seq_len=128, batch_size=8, steps=600, cycle=200, rank=64,
                     eval_every=100, eval_tokens=65536, device="cpu", precision="fp32", save_every=200, keep_checkpoints=True,
                     note="cpu-long's model (LLaMA-20M shape, 4096-token BPE) for 600 steps",
                     contenders=("adamw", "muon", "osp", "low_rank_restarts", "low_rank_muon")),
    # The papers' 60M shape on one lent GPU, sized to one command under 8 minutes: 5 contenders,
    # 600 steps × 16k tokens (9.8M tokens) each, bf16 autocast. `benchmarks/gpu_quick.sh` runs it.
    "gpu-60m-quick": Suite(model="llama_60m", vocab_size=32000, seq_len=256, batch_size=64, steps=600, cycle=200, rank=128,
                           eval_every=200, eval_tokens=262_144, device="cuda", precision="bf16-mixed",
                           note="GaLore's LLaMA-60M; 9.8M tokens per contender",
                           contenders=("adamw", "galore-torch", "fira", "low_rank_restarts", "lowrank_sparse")),
    # The papers' shapes for one GPU (bf16 autocast), about 10 minutes per contender on an H100.
    "gpu-60m": Suite(model="llama_60m", vocab_size=32000, seq_len=256, batch_size=128, steps=2000, cycle=200, rank=128,
                     eval_every=200, eval_tokens=1_000_000, device="cuda", precision="bf16-mixed",
                     note="GaLore's LLaMA-60M; 65.5M tokens per contender", contenders=_CPU_SMALL_CONTENDERS),
    "gpu-130m": Suite(model="llama_130m", vocab_size=32000, seq_len=256, batch_size=128, steps=2000, cycle=200, rank=256,
                      eval_every=200, eval_tokens=1_000_000, device="cuda", precision="bf16-mixed",
                      note="GaLore's LLaMA-130M; 65.5M tokens per contender", contenders=_CPU_SMALL_CONTENDERS),
}
