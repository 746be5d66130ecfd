"""The finding-sweep protocol: the one definition of the regime the width/depth, scale and activation
sweeps train in, and of the pre-stated plateau test their verdicts depend on.

Why a protocol (docs/sparsity_metrics_and_laws.md §Testing the findings): the Sparsing Law's
width/depth and scale findings are statements about the *limit* activation ratio. The paper's own
ReLU laws come within 10% of their limit only after 160–890 training tokens per non-embedding
parameter, so a proxy trained to a few tokens per parameter cannot test them. Every run of a finding
sweep is therefore sized for the regime rather than for its parameter count:

- **Budget**: at least :data:`TOKENS_PER_PARAM` training tokens per non-embedding parameter, the same
  for every size (size is not confounded with budget).
- **Batch**: sequences of :data:`SEQ_LEN` tokens; the batch is the largest power of two up to
  :data:`MAX_BATCH` sequences that still gives :data:`MIN_STEPS` optimizer steps (tiny models get
  smaller batches so that their curves have enough points).
- **Learning rate**: a constant LR after a linear warm-up of :data:`WARMUP_SHARE` of the steps; no
  decay, so the ratio reflects data, not the schedule. Standard parameterisation with one LR for
  every shape would confound shape with LR, so each shape gets the best of :data:`LR_CANDIDATES` by
  held-out loss after 300 steps (``benchmarks/lr_pilot.py``; its tables are committed in
  ``notebooks/results/lr_pilot_*.json`` and each sweep file copies the chosen LRs, a test checks
  they agree). :data:`LEARNING_RATE` is only the default of :func:`shape_point`.
- **Checkpoints**: :data:`N_CHECKPOINTS` log-spaced in tokens from the end of warm-up to the last
  step (``train.checkpoint_steps``), all kept and all evaluated.
- **Metric**: CETT-PPL-1% with one CETT searched jointly on the last 5 checkpoints and applied to
  every checkpoint (:data:`EVAL`, the paper's procedure), plus the zero criterion.
- **Plateau test** (:func:`plateau_verdict`, written down before any data): see there.

Nothing here imports JAX or SciPy at module level; sweep files call :func:`shape_point`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from sparsejax.eval_options import EvalOptions

TOKENS_PER_PARAM = 300
SEQ_LEN = 128
MAX_BATCH = 64
MIN_STEPS = 400
WARMUP_SHARE = 0.02
MIN_WARMUP = 10
LEARNING_RATE = 1e-2
N_CHECKPOINTS = 12
EVAL_TOKENS = 8 * MAX_BATCH * SEQ_LEN  # every run is evaluated on the same 65,536 held-out tokens
# eval_batches=0: each run's train.eval_batches, which the regime sets to EVAL_TOKENS / its batch.
EVAL = EvalOptions(metrics=("zero", "cett_ppl"), cett_ppl_mode="joint", joint_last=5, eval_batches=0)

# The learning rates a shape is piloted at (benchmarks/lr_pilot.py picks the best by eval loss).
LR_CANDIDATES = (3e-3, 1e-2, 2e-2)

# µP (sparsejax.mup) on the CPU proxies: MiniCPM's constants (config.PAPER_MUP) with widths measured
# against MUP_BASE, the narrowest width the CPU sweeps train, instead of the paper's 256, and one
# base learning rate for every shape. The transfer table (notebooks/results/lr_transfer.json: widths
# 16–128, one schedule for every width) puts µP's best LR at 3e-2 (width 16) or 1e-1 (32–128): one
# grid step apart, so 3e-2 lies within one step of every width's best, at a loss 0–2% above it.
# (SP's best falls from 1e-2 to 3e-3 over the same widths.) The µP sweeps were trained at this value.
MUP_BASE = 16
MUP_LEARNING_RATE = 3e-2
# The limit findings' budget under µP: 1,000 tokens per non-embedding parameter (the 300 of
# TOKENS_PER_PARAM left every CPU run short of its plateau).
LIMIT_TOKENS_PER_PARAM = 1000


def mup_overrides(dim_model_base: int) -> tuple[str, ...]:
    """``--set`` overrides that train a shape with µP as the paper presets do, widths measured
    against ``dim_model_base``."""
    from sparsejax.config import PAPER_MUP

    fields = {**PAPER_MUP, "dim_model_base": dim_model_base}
    return tuple(f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fields.items())

# The plateau test (see plateau_verdict), fixed before any sweep data was read.
PLATEAU_DECADES = 1.0  # the window: the last decade of training tokens
PLATEAU_MAX_CHANGE = 0.05  # the equivalence margin: |change per decade| < 5% of the level
PLATEAU_LEVEL = 0.90  # two one-sided 5% tests = the 90% interval inside the margin
PLATEAU_MIN_POINTS = 4

# Verdicts of a run's plateau test and of a finding.
PLATEAU = "plateau"
MOVING = "limit not reached"
UNDETERMINED = "undetermined (too noisy)"
NOT_TESTABLE = "not testable at this budget"


def log_spaced_steps(first: int, last: int, n: int) -> tuple[int, ...]:
    """``n`` steps from ``first`` to ``last`` (both included) evenly spaced in log steps, rounded and
    de-duplicated (fewer than ``n`` when the range is too short to hold ``n`` distinct steps)."""
    if not 1 <= first <= last or n < 1:
        raise ValueError(f"log_spaced_steps needs 1 <= first <= last and n >= 1; got {first}, {last}, {n}")
    if n == 1 or first == last:
        return (last,)
    ratio = math.log(last / first) / (n - 1)
    return tuple(sorted({min(last, round(first * math.exp(i * ratio))) for i in range(n)} | {last}))


@dataclasses.dataclass(frozen=True)
class Regime:
    """Steps, batch, warm-up and checkpoints of one run under the protocol."""

    params: int  # non-embedding parameters
    batch_size: int
    steps: int
    warmup_steps: int
    checkpoint_steps: tuple[int, ...]
    seq_len: int = SEQ_LEN
    eval_tokens: int = EVAL_TOKENS

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len * self.steps

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    def overrides(self, learning_rate: float = LEARNING_RATE) -> tuple[str, ...]:
        """``--set`` overrides of the run (steps, batch, schedule, checkpoints, cadence)."""
        return (f"train.steps={self.steps}", f"train.batch_size={self.batch_size}", f"train.seq_len={self.seq_len}",
                "train.schedule=constant", f"train.warmup_steps={self.warmup_steps}",
                f"train.learning_rate={learning_rate}",
                f"train.checkpoint_steps={','.join(map(str, self.checkpoint_steps))}",
                f"train.checkpoint_every={self.steps}", f"train.keep_every={self.steps}", "train.keep_last=1",
                f"train.eval_every={self.steps}", f"train.log_every={max(1, self.steps // 200)}",
                f"train.eval_batches={self.eval_batches}")

    @property
    def eval_batches(self) -> int:
        return max(1, self.eval_tokens // (self.batch_size * self.seq_len))


def regime(params: int, tokens_per_param: float = TOKENS_PER_PARAM, *, seq_len: int = SEQ_LEN,
           max_batch: int = MAX_BATCH, eval_tokens: int = EVAL_TOKENS) -> Regime:
    """The protocol's run for a model of ``params`` non-embedding parameters (sequences of ``seq_len``,
    at most ``max_batch`` of them per step: the CPU defaults, or an accelerator sweep's)."""
    if params <= 0:
        raise ValueError(f"params={params} must be > 0")
    tokens = tokens_per_param * params
    batch = max_batch
    while batch > 1 and tokens / (batch * seq_len) < MIN_STEPS:
        batch //= 2
    steps = math.ceil(tokens / (batch * seq_len))
    warmup = max(MIN_WARMUP, round(WARMUP_SHARE * steps))
    return Regime(params, batch, steps, warmup, log_spaced_steps(warmup, steps, N_CHECKPOINTS),
                  seq_len, eval_tokens)


def gated_d_ff(d_model: int) -> int:
    """The finding sweeps' gated FFN width: 2.5·d_model, as the paper's models."""
    return int(round(2.5 * d_model))


def shape_regime(d_model: int, n_layers: int, *, head_dim: int, tokens_per_param: float = TOKENS_PER_PARAM,
                 **regime_kwargs) -> Regime:
    """The protocol's run for a shape (gated FFN of :func:`gated_d_ff`, heads of ``head_dim``)."""
    params = shape_params(d_model, n_layers, head_dim=head_dim, d_ff=gated_d_ff(d_model))
    return regime(params, tokens_per_param, **regime_kwargs)


def shape_point(d_model: int, n_layers: int, *, head_dim: int, learning_rate: float = LEARNING_RATE,
                size: str = "", tokens_per_param: float = TOKENS_PER_PARAM, mup_base: int = 0,
                **regime_kwargs):
    """A sweep axis point: the shape (gated FFN, d_ff = 2.5·d_model, heads of ``head_dim``) together
    with its protocol regime (``regime_kwargs``: seq_len, max_batch, eval_tokens) and learning rate,
    so that every run's budget follows its own size. ``mup_base`` > 0: trained with µP
    (:func:`mup_overrides`), ``learning_rate`` then being the base learning rate."""
    from sparsejax.sweep import spec

    d_ff = gated_d_ff(d_model)
    run = shape_regime(d_model, n_layers, head_dim=head_dim, tokens_per_param=tokens_per_param,
                       **regime_kwargs)
    base = spec.shape_point(f"w{d_model}_l{n_layers}", d_model=d_model, n_layers=n_layers,
                            n_heads=max(1, d_model // head_dim), head_dim=head_dim, d_ff=d_ff,
                            size=size or f"{run.params / 1e3:.1f}k")
    mup = mup_overrides(mup_base) if mup_base else ()
    return dataclasses.replace(base, overrides=base.overrides + mup + run.overrides(learning_rate))


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """What the GPU or TPU versions of a finding sweep share (``configs/sweeps/{gpu,tpu}_*.py``):
    the base config and data overrides, heads, the regime's sequence/batch/eval sizes, and µP with
    widths measured against ``mup_base`` and one base ``learning_rate`` for every shape (µP's
    learning-rate transfer, shown on the CPU proxies by ``benchmarks/lr_pilot.py --mup-bases``)."""

    config: str
    data: tuple[str, ...]  # --set overrides common to every run (dataset, tokenizer, lengths)
    head_dim: int
    mup_base: int
    learning_rate: float
    seq_len: int
    max_batch: int
    eval_tokens: int

    def point(self, d_model: int, n_layers: int, *, size: str = ""):
        """:func:`shape_point` with this setup's heads, regime, µP and learning rate."""
        return shape_point(d_model, n_layers, head_dim=self.head_dim, learning_rate=self.learning_rate,
                           size=size, mup_base=self.mup_base, seq_len=self.seq_len,
                           max_batch=self.max_batch, eval_tokens=self.eval_tokens)


# One GPU, ~0.1M parameters: byte tokens from TFDS lm1b (the embedded corpus is too small for
# 30M tokens per run), sequences of 256; µP against the CPU proxies' base width and learning rate.
GPU = Accelerator(config="configs/tiny_relu.py",
                  data=("data.source=tfds", "data.tfds_name=lm1b", "data.tfds_eval_split=test",
                        "model.max_seq_len=256"),
                  head_dim=16, mup_base=MUP_BASE, learning_rate=MUP_LEARNING_RATE, seq_len=256,
                  max_batch=256, eval_tokens=16 * 256 * 256)
# A v5e-16 slice, 2–50M parameters: C4 with a 32,000-piece SentencePiece vocabulary, sequences of
# 1,024, the 0.1B paper model's pod settings otherwise, and the paper's µP: base width 256, one
# peak learning rate 0.01 (config.PAPER_MUP, PAPER_LEARNING_RATE).
TPU_VOCAB = 32_000
TPU = Accelerator(config="configs/sparsing_law_0.1b.py",
                  data=("data.source=tfds", "data.tfds_name=c4", "data.tokenizer=sentencepiece",
                        f"data.sentencepiece_vocab_size={TPU_VOCAB}", f"model.vocab_size={TPU_VOCAB}",
                        "model.max_seq_len=1024", "train.grad_accum=1"),
                  head_dim=64, mup_base=256, learning_rate=1e-2, seq_len=1024, max_batch=256,
                  eval_tokens=8 * 1024 * 256)


def shape_params(d_model: int, n_layers: int, *, head_dim: int, d_ff: int, ffn_type: str = "gated") -> int:
    """Non-embedding parameters of a shape (``flops.param_counts``; heads of ``head_dim``)."""
    from sparsejax import config as config_lib, flops

    m = config_lib.ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=max(1, d_model // head_dim),
                               head_dim=head_dim, d_ff=d_ff, ffn_type=ffn_type)
    return flops.param_counts(m).non_embedding


# ----------------------------------------------------------------------------- the plateau test
@dataclasses.dataclass(frozen=True)
class Plateau:
    """A run's plateau test on one ratio series (see :func:`plateau_verdict`)."""

    verdict: str  # PLATEAU, MOVING or UNDETERMINED
    level: float  # mean ratio in the window
    slope: float  # change per decade of tokens (OLS on log10 tokens)
    slope_ci: tuple[float, float]  # 90% (PLATEAU_LEVEL)
    n_points: int
    window: tuple[float, float]  # tokens

    @property
    def change(self) -> float:
        """|change per decade| relative to the level."""
        return abs(self.slope) / self.level if self.level > 0 else math.inf

    def describe(self) -> str:
        return (f"{self.verdict}: level {100 * self.level:.2f}%, {100 * self.slope:+.2f} pp/decade "
                f"[{100 * self.slope_ci[0]:+.2f}, {100 * self.slope_ci[1]:+.2f}] ({self.change:.1%} of the level, margin "
                f"{PLATEAU_MAX_CHANGE:.0%}; "
                f"{self.n_points} points, {self.window[0]:.3g}–{self.window[1]:.3g} tokens)")


def plateau_verdict(tokens: Sequence[float], ratio: Sequence[float]) -> Plateau:
    """The plateau test, stated before the data.

    Window: the points in the last :data:`PLATEAU_DECADES` decade(s) of training tokens (tokens ≥
    final/10). A least-squares line of the ratio on log10(tokens) there gives the change per decade
    with its 90% Student-t interval (:data:`PLATEAU_LEVEL`); the level is the window's mean ratio.
    The margin is ±:data:`PLATEAU_MAX_CHANGE` of the level per decade.

    - **plateau** (the limit is reached): the whole interval lies inside the margin — an
      equivalence test (two one-sided tests at 5%): the data show the ratio moves by less than 5%
      of its level per decade;
    - **limit not reached**: the whole interval lies outside the margin on one side (the ratio
      demonstrably still moves by more than 5% per decade);
    - **undetermined**: the interval straddles the margin (the data cannot tell), or the window
      holds fewer than :data:`PLATEAU_MIN_POINTS` points.

    Why an equivalence test and not "the interval includes 0": under the latter, a flat series
    fails by chance 5% of the time, so a finding read from 8 flat runs would be declared untestable
    34% of the time, and a noisier run would pass more easily than a precise one. Here noise can
    only make a run undetermined, never a plateau.
    """
    import numpy as np

    from sparsejax.laws import analysis

    t, r = np.asarray(tokens, dtype=float), np.asarray(ratio, dtype=float)
    keep = np.isfinite(t) & np.isfinite(r) & (t > 0)
    t, r = t[keep], r[keep]
    if not len(t):
        raise ValueError("plateau test: no finite points")
    lo_tokens = t.max() / 10**PLATEAU_DECADES
    window = t >= lo_tokens
    x, y = np.log10(t[window]), r[window]
    mean = float(y.mean())
    span = (float(t[window].min()), float(t.max()))
    if len(x) < max(3, PLATEAU_MIN_POINTS) or np.ptp(x) == 0:
        return Plateau(UNDETERMINED, mean, math.nan, (math.nan, math.nan), len(x), span)
    line = analysis.fit_line(x, y, PLATEAU_LEVEL)
    lo, hi = line.slope_ci
    margin = PLATEAU_MAX_CHANGE * abs(mean)
    if -margin < lo and hi < margin:
        verdict = PLATEAU
    elif lo >= margin or hi <= -margin:
        verdict = MOVING
    else:
        verdict = UNDETERMINED
    return Plateau(verdict, mean, line.slope, (lo, hi), len(x), span)


# The ratio a finding reads, and the one beside it for activations with exact zeros.
PLATEAU_METRIC, ZERO_METRIC = "cett_ppl_ratio", "zero_ratio"


def run_plateaus(rows: Sequence[dict], run) -> dict[str, Plateau]:
    """A run's plateau tests from a sweep table's rows: its CETT-PPL-1% ratio and, where the
    activation has exact zeros, its zero-criterion ratio, at the checkpoints after its warm-up.
    A series without a finite point is left out."""
    import numpy as np

    from sparsejax import activations
    from sparsejax.sweep.table import series

    metrics = [PLATEAU_METRIC] + ([ZERO_METRIC] if activations.get(run.activation).exact_zeros else [])
    out = {}
    for metric in metrics:
        tokens, values = series(rows, run.name, metric, after_step=run.warmup_steps)
        if np.isfinite(values).any():
            out[metric] = plateau_verdict(tokens, values)
    return out


def finding_testable(plateaus: Sequence[Plateau]) -> bool:
    """A finding about the limit ratio is testable only when every run it reads reached its plateau."""
    return bool(plateaus) and all(p.verdict == PLATEAU for p in plateaus)
