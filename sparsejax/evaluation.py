"""Sparsity evaluation of trained runs: the registered metrics (:mod:`sparsejax.eval_metrics`:
zero, top-k, FAT-ε, CETT, CETT-PPL-p%, ...) over checkpoints, and the forward passes they measure in.

Definitions and search procedures are those of the Sparsing Law paper (arXiv 2411.02335) and its
reference code (thunlp/SparsingLaw ``src/calc_activation.py``, ``src/model_utils.py``); see
docs/sparsity_metrics_and_laws.md §Reference procedure:

* every criterion except *zero* is applied as a **sparse forward pass**: the dropped neurons are
  removed inside the FFN (``Transformer(sparsity=Sparsity(thresholds=...))``), so later layers
  see the pruned output, and the activation ratio and loss are measured in that pass;
* *CETT c*: a dense pass records σ(gate)·up of every layer; each layer gets the CETT threshold t_l
  of target c (``cett.cett_threshold_*``, the reference's 65,536-candidate bisection); the
  sparse pass drops neuron i when |σ(gate)·up|_i < t_l / ‖W_out[i]‖;
* *CETT-PPL-p%*: an outer bisection over c in [0, 1] (tolerance 1e-3) for the c at which the
  perplexity ratio exp(loss_sparse − loss_dense) reaches 1 + p/100. The ``joint`` mode searches c
  on the last ``joint_last`` post-warm-up checkpoints together (their mean perplexity ratio,
  docs/sparsity_metrics_and_laws.md §CETT-PPL) and applies it to every post-warm-up checkpoint, as
  the paper does for training curves.

Memory (the reference pools all evaluation tokens for the CETT grid): statistics are reduced in-graph
per batch (``metrics.stats_update``), so nothing of size tokens × d_ff × layers is kept for the
zero/FAT/top-k metrics. CETT needs each layer's pooled σ(gate)·up; they are held in host memory
when they fit in ``max_cache_gib`` and otherwise spilled to per-(layer, batch) ``.npy`` files read
back one layer at a time, so at most one layer's tokens × d_ff is in memory at once.

The dense loss and each checkpoint's dense intermediates are computed once and cached; every
pass reuses one compiled function per criterion, so a search costs about its number of forward
passes, which is counted and reported. The evaluation batches are placed on the mesh once and
read by every pass; a pass dispatches its batches without waiting on any and reads the
per-batch loss sums in one transfer at its end (summed on the host in batch order, in float64).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import shutil
import sys
import tempfile
import time
import weakref
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import (cett as cett_lib, config as config_lib, data, eval_metrics, eval_options,
                       flops, metrics as metrics_lib, model as model_lib, results as results_lib,
                       sharding, sparsity as sparsity_lib, trained_run)
from sparsejax.eval_metrics import CettPplSearch, bisect_cett, ppl_ratio  # noqa: F401 - re-exported
from sparsejax.eval_options import CETT_PPL_MODES, METRICS, EvalError, EvalOptions  # noqa: F401 - re-exported
from sparsejax.loss import model_loss
from sparsejax.sparsity_plan import SparsityPlan

CETT_SEARCHES = {"incremental": cett_lib.cett_threshold_incremental,
                 "reference": cett_lib.cett_threshold_reference}
assert set(CETT_SEARCHES) == set(eval_options.CETT_SEARCHES)


# ------------------------------------------------------------------------------- pass kinds
@dataclasses.dataclass(frozen=True)
class SparsePass:
    """One kind of forward pass over the evaluation set: what the FFN masks and by which rule
    activity is measured in it. The evaluator compiles one function per kind (on first use).

    masks: ``masks(ev, thresholds_NxF) -> dict``: the keyword arguments of
        ``SparsityPlan.model_input`` that mask the FFN (``thresholds``/``mask_target``,
        ``eval_masks``: FFN masks of ``ffn.EVAL_MASKS``, ``topk_k``); {} for the dense model.
    active: ``active(ev, act_BxLxF, hidden_BxLxF, threshold_F, keep) -> bool [B, L, F]``: the
        measured mask, by the one rule of ``sparsity.active``; ``keep`` is the training top-k's
        keep mask of the pass (None without one).
    reference_ffn: run on the einsum FFN (masks a block-sparse kernel cannot express).
    histograms: the pass's statistics hold |σ(gate)| histograms (the dense pass).
    """

    name: str
    masks: Callable[[Any, Any], dict]
    active: Callable[..., Any]
    reference_ffn: bool = False
    histograms: bool = False


PASSES: dict[str, SparsePass] = {}


def register_pass(spec: SparsePass) -> SparsePass:
    """Add a pass kind a metric measures in (``Evaluator.sparse(params, spec.name, ...)``)."""
    if spec.name in PASSES:
        raise ValueError(f"evaluation pass {spec.name!r} is already registered")
    PASSES[spec.name] = spec
    return spec


_METRIC_PASSES_BUILT: set = set()  # the metric entries whose ``passes`` are registered


def passes() -> dict[str, SparsePass]:
    """:data:`PASSES`, with the pass kinds of every registered metric's ``passes`` built."""
    for metric in list(eval_metrics.METRICS.values()):
        if metric.passes is not None and metric not in _METRIC_PASSES_BUILT:
            _METRIC_PASSES_BUILT.add(metric)
            for spec in metric.passes():
                register_pass(spec)
    return PASSES


def _flat(fn, act_BxLxF):
    """``fn`` of the [T, F] view of ``act_BxLxF``, as [B, L, F]."""
    return fn(act_BxLxF.reshape(-1, act_BxLxF.shape[-1])).reshape(act_BxLxF.shape)


# The unmasked model, activity by the zero rule (σ(gate) ≠ 0).
register_pass(SparsePass("zero", lambda ev, thr: {},
                         lambda ev, a, h, thr_F, keep: sparsity_lib.active(a, None, keep),
                         histograms=True))


def _threshold_pass(target: str) -> SparsePass:
    """Per-neuron thresholds on σ(gate) ("activation": FAT-ε) or σ(gate)·up ("hidden": CETT),
    measured by the same rule and threshold the mask dropped neurons by."""
    def active(ev, act_BxLxF, hidden_BxLxF, threshold_F, keep):
        measured = act_BxLxF if target == "activation" else hidden_BxLxF
        return sparsity_lib.active(measured, threshold_F, keep)

    return SparsePass(target, lambda ev, thr: {"thresholds": thr, "mask_target": target}, active)


for _target in sparsity_lib.MASK_TARGETS:
    register_pass(_threshold_pass(_target))

# The per-token top-k pass is the training-time top-k of the einsum FFN at k (exact, no STE:
# ``SparsityPlan.model_input(topk_k=k)``).
register_pass(SparsePass("topk", lambda ev, thr: {"topk_k": ev.topk_k},
                         lambda ev, a, h, thr_F, keep: _flat(
                             lambda x: metrics_lib.topk_active_TxF(x, ev.topk_k), a),
                         reference_ffn=True))
# The reference's global top-k (``prune_topk``), an FFN mask of the model (``ffn.EVAL_MASKS``).
register_pass(SparsePass("topk_global",
                         lambda ev, thr: {"eval_masks": (("global_topk", ev.topk_fraction),)},
                         lambda ev, a, h, thr_F, keep: _flat(
                             lambda x: metrics_lib.global_topk_active_TxF(x, ev.topk_fraction), a)))


# --------------------------------------------------------------------------- hidden-state store
class HiddenStore:
    """Per-layer σ(gate)·up of the valid tokens of every evaluation batch: [T_b, F] arrays.

    In memory, or spilled to ``.npy`` files (read back memory-mapped, one layer at a time).
    """

    def __init__(self, n_layers: int, *, spill: bool = False, spill_root: pathlib.Path | None = None):
        self.n_layers = n_layers
        self.spill_dir = None
        if spill:
            self.spill_dir = pathlib.Path(tempfile.mkdtemp(prefix="hidden_", dir=spill_root))
            # The files go when the store does, however the evaluation ends.
            weakref.finalize(self, shutil.rmtree, self.spill_dir, True)
        self._layers: list[list] = [[] for _ in range(n_layers)]

    def add(self, hidden_NxTxF: np.ndarray) -> None:
        for layer, hidden_TxF in enumerate(hidden_NxTxF):
            if self.spill_dir is None:
                self._layers[layer].append(hidden_TxF)
            else:
                path = self.spill_dir / f"layer{layer}_batch{len(self._layers[layer])}.npy"
                np.save(path, hidden_TxF)
                self._layers[layer].append(path)

    def layer(self, layer: int) -> list[np.ndarray]:
        return [np.load(x, mmap_mode="r") if isinstance(x, pathlib.Path) else x
                for x in self._layers[layer]]


# ------------------------------------------------------------------------------ forward passes
@dataclasses.dataclass
class PassResult:
    """One forward pass over the evaluation set under one mask rule."""

    loss: float  # mean next-token loss over valid tokens
    tokens: int
    reports: list[metrics_lib.SparsityReport]  # per layer
    hidden: HiddenStore | None = None


class Evaluator:
    """Compiled forward passes of one run's model over a fixed evaluation set."""

    def __init__(self, cfg: config_lib.Config, options: EvalOptions,
                 batches: list[dict] | None = None):
        self.cfg, self.options = cfg, options
        m = cfg.model
        self.n_layers, self.d_ff = m.n_layers, m.d_ff
        self.plan = sharding.plan(cfg.mesh)
        self.mesh = self.plan.mesh
        self._rules = sharding.rules(cfg.mesh)
        if batches is None:
            eval_cfg = dataclasses.replace(
                cfg, train=dataclasses.replace(
                    cfg.train, eval_batches=options.eval_batches or cfg.train.eval_batches))
            try:
                batches = data.validation_batches(eval_cfg, jax.process_index(),
                                                  jax.process_count())
            except data.DataError as err:  # e.g. the run's text files were moved or deleted
                raise EvalError(f"the run's validation data cannot be read: {err}") from None
        self.batches = batches
        self.eval_tokens = int(sum(float(np.sum(b["weights"] > 0)) for b in batches))
        self.forward_passes = 0  # batches × passes, as in "the search costs ≈ its forward passes"
        self.batch_progress = False  # a progress bar over each pass's batches
        # The training-time sparsity controls (static, or scheduled and then valued at the
        # checkpoint's step: ``at_step``) are part of the trained model: every pass runs with
        # the plan's input.
        self.sparsity = SparsityPlan.of(cfg)
        self._coefs: Optional[dict] = None
        # The one fraction -> k rule, the one training uses (sparsity.topk_count).
        try:
            self.topk_k = sparsity_lib.topk_count(
                float(options.topk) if options.topk < 1 else int(options.topk), m.d_ff)
        except ValueError:
            raise EvalError(f"--topk={options.topk:g} is more neurons than this model has "
                            f"(d_ff={m.d_ff}); give a fraction < 1 or a count in [1, {m.d_ff}]"
                            ) from None
        self.topk_fraction = self.topk_k / m.d_ff
        self._model = model_lib.Model(m, self._rules)
        self._reference_model = model_lib.Model(dataclasses.replace(m, ffn_impl="reference"),
                                                self._rules)
        self._passes: dict[tuple[str, bool], Callable] = {}

    # -- compiled passes ---------------------------------------------------------------------
    def pass_fn(self, name: str, keep_hidden: bool = False):
        """The compiled pass of kind ``name`` (:data:`PASSES`), compiled once per evaluator."""
        key = (name, keep_hidden)
        if key not in self._passes:
            spec = passes()[name]
            model = self._reference_model if spec.reference_ffn else self._model
            self._passes[key] = self._compile(model, spec, keep_hidden)
        return self._passes[key]

    def at_step(self, step: int) -> None:
        """Evaluate the checkpoint of ``step``: the traced terms' values at that step."""
        if self.sparsity.active:
            self._coefs = self.sparsity.coefficients(step)

    def _compile(self, model: model_lib.Model, spec: SparsePass, keep_hidden: bool):
        def pass_fn(params, batch, stats, thresholds_NxF, coefs):
            sp = self.sparsity.model_input(coefs, **spec.masks(self, thresholds_NxF))
            mean_loss, tokens, inter = model_loss(model, params, batch, sparsity=sp,
                                                  collect=("intermediates",),
                                                  loss_tile_len=self.cfg.train.loss_tile_len)
            acts, hiddens = model.ffn_intermediates(inter)
            valid_BxL = batch["weights"] > 0
            # A neuron the training top-k dropped is inactive when the pass's input applies one.
            new_stats = [
                metrics_lib.stats_update(
                    s, spec.active(self, a, h, thresholds_NxF[i],
                                   sparsity_lib.trained_keep(h, sp.trained_topk)),
                    a if spec.histograms else None, valid_BxL)
                for i, (s, a, h) in enumerate(zip(stats, acts, hiddens))]
            out = (mean_loss * tokens, tokens, new_stats)
            if keep_hidden:
                out = out + (jnp.stack(hiddens).astype(jnp.float32),)
            return out

        def wrapper(*args):
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
                return pass_fn(*args)

        return jax.jit(wrapper)

    @functools.cached_property
    def _device_batches(self) -> list[dict]:
        """The evaluation batches on the mesh, placed once: every pass of a search (and every
        checkpoint) reads the same arrays instead of uploading them again."""
        return [self.plan.global_batch(batch) for batch in self.batches]

    @functools.cached_property
    def _empty_stats(self) -> list[metrics_lib.SparsityStats]:
        """Each pass's starting accumulators, replicated on the mesh once (read, never written)."""
        return jax.device_put([metrics_lib.stats_init(self.d_ff) for _ in range(self.n_layers)],
                              self.plan.replicated)

    def _accumulate(self, fn, params, thresholds_NxF, hidden: HiddenStore | None = None):
        """One pass over the placed batches: (per-layer statistics on the device, [(loss sum,
        tokens)] per batch on the host, read in one transfer after the last batch)."""
        stats = self._empty_stats
        batches = zip(self.batches, self._device_batches)
        if self.batch_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="forward pass", unit="batch", leave=False,
                           dynamic_ncols=True, total=len(self.batches))
        per_batch = []
        for batch, device_batch in batches:
            out = fn(params, device_batch, stats, thresholds_NxF, self._coefs)
            stats = out[2]
            per_batch.append(out[:2])
            if hidden is not None:
                valid = np.asarray(batch["weights"]).reshape(-1) > 0
                hidden_NxBxLxF = jax.device_get(out[3])
                hidden.add(hidden_NxBxLxF.reshape(self.n_layers, -1, self.d_ff)[:, valid])
        self.forward_passes += len(self.batches)
        return stats, jax.device_get(per_batch)

    def _run(self, fn, params, thresholds_NxF, hidden: HiddenStore | None = None) -> PassResult:
        stats, per_batch = self._accumulate(fn, params, thresholds_NxF, hidden)
        # Summed on the host in float64, in batch order: the same total on every run and mesh.
        loss_sum, tokens = 0.0, 0.0
        for loss_b, tokens_b in per_batch:
            loss_sum += float(loss_b)
            tokens += float(tokens_b)
        reports = [metrics_lib.stats_finalize(s, self.options.dead_min_rate) for s in stats]
        return PassResult(loss_sum / tokens, int(tokens), reports, hidden)

    @functools.cached_property
    def _zero_thresholds(self):
        return jax.device_put(jnp.zeros((self.n_layers, self.d_ff), jnp.float32),
                              self.plan.replicated)

    def _no_thresholds(self):
        return self._zero_thresholds

    def dense(self, params, *, keep_hidden: bool = False, spill_root: pathlib.Path | None = None
              ) -> PassResult:
        """The unmasked model; activity by the *zero* criterion (σ(gate) ≠ 0)."""
        if not keep_hidden:
            return self._run(self.pass_fn("zero"), params, self._no_thresholds())
        need_gib = self.eval_tokens * self.d_ff * self.n_layers * 4 / 2**30
        store = HiddenStore(self.n_layers, spill=need_gib > self.options.max_cache_gib,
                            spill_root=spill_root)
        return self._run(self.pass_fn("zero", keep_hidden=True), params, self._no_thresholds(),
                         store)

    def sparse(self, params, name: str, thresholds_NxF=None) -> PassResult:
        """A pass of kind ``name`` (:data:`PASSES`); ``thresholds_NxF`` for the kinds that read
        per-neuron thresholds (zeros otherwise)."""
        if name not in passes():
            raise EvalError(f"evaluation pass {name!r}; allowed: {list(PASSES)}")
        thresholds = (self._no_thresholds() if thresholds_NxF is None
                      else jnp.asarray(thresholds_NxF, jnp.float32))
        return self._run(self.pass_fn(name), params, thresholds)

    def thresholded(self, params, thresholds_NxF, target: str) -> PassResult:
        """Sparse pass: neuron i of layer l dropped when |target|_i < thresholds_NxF[l, i]."""
        if target not in sparsity_lib.MASK_TARGETS:
            raise EvalError(f"mask target {target!r}; allowed: {list(sparsity_lib.MASK_TARGETS)}")
        return self.sparse(params, target, thresholds_NxF)

    def fat(self, params, eps: float) -> PassResult:
        """FAT-ε sparse pass: active iff |σ(gate)| ≥ ε + 1e-18 (reference ``prune_fat``)."""
        threshold = sparsity_lib.fat_threshold(eps)
        return self.thresholded(params, np.full((self.n_layers, self.d_ff), threshold), "activation")

    def topk(self, params) -> PassResult:
        """Per-token top-k sparse pass (k = ``self.topk_k`` largest |σ(gate)|)."""
        return self.sparse(params, "topk")

    def topk_global(self, params) -> PassResult:
        """The reference's top-k sparse pass: per layer, the top ``k / d_ff`` share of |σ(gate)|
        over all tokens × neurons of each evaluation batch (``prune_topk``)."""
        return self.sparse(params, "topk_global")

    def cett_thresholds(self, params, hidden: HiddenStore, cett: float
                        ) -> tuple[list[float], np.ndarray]:
        """Per-layer CETT thresholds t_l of target ``cett`` and the per-neuron mask thresholds
        t_l / ‖W_out_l[i]‖ of the sparse pass (reference ``set_thresholds``), floored at 1e-18
        unless ``options.cett_zero_rule`` is "reference" (``cett.neuron_thresholds_F``)."""
        search = CETT_SEARCHES[self.options.cett_search]
        w_outs = [np.asarray(w, np.float32) for w in self._model.ffn_out_weights(params)]
        t_layers, per_neuron = [], []
        for layer, w_out_FxD in enumerate(w_outs):
            result = search(hidden.layer(layer), w_out_FxD, float(cett))
            t_layers.append(result.threshold)
            per_neuron.append(cett_lib.neuron_thresholds_F(
                np.float32(result.threshold), w_out_FxD, self.options.cett_zero_rule))
        return t_layers, np.stack(per_neuron).astype(np.float32)

    def cett_pass(self, params, hidden: HiddenStore, cett: float) -> tuple[PassResult, list[float]]:
        t_layers, thresholds_NxF = self.cett_thresholds(params, hidden, cett)
        return self.thresholded(params, thresholds_NxF, "hidden"), t_layers


# ---------------------------------------------------------------------------------- reporting
def _report(result: PassResult, dense_loss: float, **params) -> results_lib.MetricResult:
    reports = result.reports
    lens = metrics_lib.CHUNK_LENS
    chunk = np.mean([np.asarray(r.chunk_sparsity_C) for r in reports], axis=0)
    chunk_ind = np.mean([np.asarray(r.chunk_sparsity_independent_C) for r in reports], axis=0)
    return results_lib.MetricResult(
        ratio_layers=[float(r.activation_ratio) for r in reports],
        dead_share_layers=[float(r.dead_share) for r in reports], loss=result.loss,
        ppl_ratio=ppl_ratio(result.loss, dense_loss),
        chunk_sparsity={str(n): float(v) for n, v in zip(lens, chunk)},
        chunk_sparsity_independent={str(n): float(v) for n, v in zip(lens, chunk_ind)},
        params=params)


def _histograms(result: PassResult) -> dict:
    return {"edges": list(metrics_lib.DEFAULT_HIST_EDGES),
            "counts_layers": [np.asarray(r.hist_count_S).astype(int).tolist() for r in result.reports]}


def evaluate_run(workdir: str | pathlib.Path, options: EvalOptions = EvalOptions(), *,
                 checkpoints: str = "all", progress: bool = True,
                 batches: list[dict] | None = None) -> dict:
    """Evaluate the selected checkpoints of a run; returns the results dict (schema:
    :mod:`sparsejax.results`)."""
    return evaluate(trained_run.load(workdir), options, checkpoints=checkpoints,
                    progress=progress, batches=batches)


def evaluate(run, options: EvalOptions = EvalOptions(), *, checkpoints: str = "all",
             progress: bool = True, batches: list[dict] | None = None,
             batch_progress: bool = False) -> dict:
    """Evaluate the selected checkpoints of ``run``: a :class:`trained_run.TrainedRun`, or
    anything with its ``cfg``, ``steps``, ``params(step, mesh)``, ``workdir`` and
    ``warmup_steps`` (an imported checkpoint, :class:`sparsejax.hf_import.HfRun`).
    ``batch_progress``: a progress bar over the batches of every pass (large models).

    Every metric of ``options.metrics`` is its registry entry (:mod:`sparsejax.eval_metrics`):
    run-level searches first, then, per checkpoint, one dense pass and each metric's
    ``measure``, in the registry's order."""
    steps = trained_run.select_steps(run.steps, checkpoints)
    cfg = run.cfg
    ev = Evaluator(cfg, options, batches)
    ev.batch_progress = batch_progress
    evaluators = _StepEvaluators(run, ev)
    t0 = time.perf_counter()
    warmup = run.warmup_steps
    want = [m for m in eval_metrics.METRICS.values() if m.name in set(options.metrics)]
    say = print if progress else (lambda *a, **k: None)

    vanished: list[int] = []  # steps a live trainer deleted while they were being read
    with tempfile.TemporaryDirectory(prefix="sparsejax_eval_") as scratch:
        spill_root = pathlib.Path(scratch)
        run_ctx = RunContext(run, evaluators, steps, options, spill_root, say, vanished)
        searches = {}
        for metric in want:
            if metric.after_warmup and not run_ctx.post_warmup_steps:
                raise EvalError(f"{metric.name} needs a checkpoint after warm-up "
                                f"(train.warmup_steps={warmup}); selected steps: {steps}")
            if metric.search is not None:
                searches[metric.name] = metric.search(run_ctx)

        entries = []
        bar = _progress(_readable(run, steps, checkpoints, ev.mesh, vanished), progress, "checkpoints",
                        total=len(steps))
        need_hidden = any(m.needs_hidden for m in want)
        for step_no, params, meta in bar:
            ev = evaluators.at(step_no)  # the model and sparsity this step was trained with
            ev.at_step(step_no)
            dense = ev.dense(params, keep_hidden=need_hidden, spill_root=spill_root)
            entry = results_lib.CheckpointResult(
                step=step_no, tokens_seen=float(meta.get("tokens_seen", float("nan"))),
                dense_loss=dense.loss, histograms=_histograms(dense))
            res = entry.results
            for metric in want:
                if metric.after_warmup and step_no <= warmup:
                    continue
                res[metric.name] = metric.measure(CheckpointContext(
                    ev, step_no, params, dense, options, searches.get(metric.name)))
            entries.append(entry)
            if progress and hasattr(bar, "set_postfix"):
                bar.set_postfix({k: f"{v.to_dict()['ratio']:.3f}" for k, v in res.items()})
        elapsed = time.perf_counter() - t0

    counts = flops.param_counts(cfg.model)
    return results_lib.EvalResults(
        workdir=str(run.workdir), config_name=cfg.name, activation=cfg.model.activation,
        ffn_type=cfg.model.ffn_type, d_model=cfg.model.d_model, n_layers=cfg.model.n_layers,
        d_ff=cfg.model.d_ff, params={"total": counts.total, "non_embedding": counts.non_embedding},
        eval_tokens=ev.eval_tokens, eval_batches=len(ev.batches),
        metrics=[m.name for m in want], options=dataclasses.asdict(options),
        searches={name: searches.get(name) for name in eval_metrics.searched()},
        forward_passes=evaluators.forward_passes(), seconds=elapsed,
        checkpoints=entries, vanished_steps=vanished).to_dict()


@dataclasses.dataclass
class CheckpointContext:
    """What a metric's ``measure`` sees at one checkpoint: the evaluator in the step's own
    settings, its parameters, the dense pass (with σ(gate)·up when a metric ``needs_hidden``),
    the options and the metric's run-level ``search`` result (None without one)."""

    ev: Evaluator
    step: int
    params: Any
    dense: PassResult
    options: EvalOptions
    search: Optional[dict] = None

    def report(self, result: PassResult, **params) -> results_lib.MetricResult:
        """``result`` as a metric's entry: ratios, dead neurons, loss and perplexity ratio against
        the dense pass, chunk sparsity, and the metric's ``params``."""
        return _report(result, self.dense.loss, **params)


@dataclasses.dataclass
class RunContext:
    """What a metric's run-level ``search`` sees: the selected steps, the per-step evaluators,
    the options, and reading of checkpoints that a live trainer may delete meanwhile."""

    run: Any
    evaluators: "_StepEvaluators"
    steps: list[int]
    options: EvalOptions
    spill_root: pathlib.Path
    say: Callable[..., None]
    vanished: list[int]

    @property
    def post_warmup_steps(self) -> list[int]:
        return [s for s in self.steps if s > self.run.warmup_steps]

    def at(self, step: int) -> Evaluator:
        """The evaluator of ``step``'s settings, set to its step (scheduled terms' values)."""
        ev = self.evaluators.at(step)
        ev.at_step(step)
        return ev

    def forward_passes(self) -> int:
        return self.evaluators.forward_passes()

    def dense_passes(self, steps: list[int], what: str) -> list[tuple[int, Any, PassResult]]:
        """(step, params, dense pass with σ(gate)·up kept) of each of ``steps`` still readable;
        a step deleted meanwhile is noted and left out, and none left is a RunError."""
        cached = []
        for step_no in steps:
            ev = self.evaluators.at(step_no)
            try:
                params, _ = self.run.params(step_no, ev.mesh)
            except trained_run.StepVanished as err:
                _vanished_note(err, self.vanished)
                continue
            ev.at_step(step_no)
            cached.append((step_no, params,
                           ev.dense(params, keep_hidden=True, spill_root=self.spill_root)))
        if not cached:
            raise trained_run.RunError(f"{what}: steps {steps} were all deleted while being read")
        return cached


# A live run whose trainer keeps few steps can delete every step eval picked, several times over.
MAX_VANISHED = 20


def _vanished_note(err: trained_run.StepVanished, vanished: list[int]) -> None:
    vanished.append(err.step)
    print(f"note: {err}; skipped", file=sys.stderr, flush=True)
    if len(vanished) >= MAX_VANISHED:
        raise trained_run.RunError(f"{len(vanished)} checkpoints were deleted while being read "
                                   f"(steps {vanished}); evaluate the run after its trainer has "
                                   f"finished, or train it with a larger train.keep_last") from None


def _readable(run: trained_run.TrainedRun, steps: list[int], spec: str, mesh, vanished: list[int]):
    """(step, params, meta) of each selected step that can still be read.

    With ``--checkpoints all`` or ``last`` on a live run, a step deleted by the trainer's
    ``keep_last`` cleanup while it is read is skipped with a note (and, if none of the selected
    steps is left, the newest step now is taken instead); steps named explicitly must all be read.
    """
    queue, done = list(steps), 0
    while queue:
        step_no = queue.pop(0)
        try:
            params, meta = run.params(step_no, mesh)
        except trained_run.StepVanished as err:
            if spec not in ("all", "last"):
                raise
            _vanished_note(err, vanished)
            if not queue and not done:
                queue = [s for s in run.reader.refresh() if s > step_no][-1:]
            continue
        done += 1
        yield step_no, params, meta
    if not done:
        raise trained_run.RunError(f"no selected checkpoint of {run.workdir} could be read: steps "
                                   f"{vanished} were deleted while being read")


def _progress(items, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="ckpt", dynamic_ncols=True, total=total)


class _StepEvaluators:
    """One :class:`Evaluator` per distinct model and sparsity settings among a run's checkpoints:
    each step is evaluated with the settings it was trained with (its own meta's config,
    ``TrainedRun.step_config``), so a ``--force`` restart that changed them cannot make older
    checkpoints be measured as the new model. All share the first one's batches."""

    def __init__(self, run, first: Evaluator):
        self.run, self.first = run, first
        self._by_key = {self._key(first.cfg): first}

    @staticmethod
    def _key(cfg: config_lib.Config) -> str:
        return repr((cfg.model, cfg.sparsity))

    def at(self, step: int) -> Evaluator:
        step_config = getattr(self.run, "step_config", None)
        if step_config is None:
            return self.first
        cfg = step_config(step)
        key = self._key(cfg)
        if key not in self._by_key:
            ev = Evaluator(cfg, self.first.options, self.first.batches)
            ev.batch_progress = self.first.batch_progress
            self._by_key[key] = ev
        return self._by_key[key]

    def forward_passes(self) -> int:
        return sum(ev.forward_passes for ev in self._by_key.values())
