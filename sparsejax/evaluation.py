"""Sparsity evaluation of trained runs: zero, top-k, FAT-ε, CETT and CETT-PPL-p% over checkpoints.

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
import math
import pathlib
import shutil
import sys
import tempfile
import time
import weakref
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import (cett as cett_lib, config as config_lib, data, eval_options,
                       flops, metrics as metrics_lib, model as model_lib, results as results_lib,
                       sharding, sparsity as sparsity_lib, trained_run)
from sparsejax.eval_options import CETT_PPL_MODES, METRICS, EvalError, EvalOptions  # noqa: F401 - re-exported
from sparsejax.loss import model_loss
from sparsejax.sparsity_plan import SparsityPlan

CETT_SEARCHES = {"incremental": cett_lib.cett_threshold_incremental,
                 "reference": cett_lib.cett_threshold_reference}
assert set(CETT_SEARCHES) == set(eval_options.CETT_SEARCHES)


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
        self._model = model_lib.Model(m, self._rules)
        self._dense = self._compile(self._model, "zero", keep_hidden=False)
        self._dense_keep = None
        self._threshold = {t: self._compile(self._model, t, keep_hidden=False)
                           for t in sparsity_lib.MASK_TARGETS}
        # The per-token top-k pass is the training-time top-k of the einsum FFN at k (exact, no
        # STE: ``SparsityPlan.model_input(topk_k=k)``).
        self._topk = self._compile(model_lib.Model(dataclasses.replace(m, ffn_impl="reference"),
                                                   self._rules), "topk", keep_hidden=False)
        self.topk_fraction = self.topk_k / m.d_ff
        self._topk_global = self._compile(self._model, "topk_global", keep_hidden=False)

    # -- compiled passes ---------------------------------------------------------------------
    def _active(self, rule: str, act_BxLxF, hidden_BxLxF, threshold_F, sp):
        """The measured mask of a pass, by the one rule of ``sparsity.active``; a neuron the
        training top-k dropped is inactive when the pass's input ``sp`` applies one."""
        keep = sparsity_lib.trained_keep(hidden_BxLxF, sp.trained_topk)
        if rule == "zero":
            return sparsity_lib.active(act_BxLxF, None, keep)
        if rule == "topk":
            flat = act_BxLxF.reshape(-1, act_BxLxF.shape[-1])
            return metrics_lib.topk_active_TxF(flat, self.topk_k).reshape(act_BxLxF.shape)
        if rule == "topk_global":
            flat = act_BxLxF.reshape(-1, act_BxLxF.shape[-1])
            return metrics_lib.global_topk_active_TxF(flat, self.topk_fraction).reshape(act_BxLxF.shape)
        # The same rule (and threshold) the model's mask dropped neurons by.
        measured = act_BxLxF if rule == "activation" else hidden_BxLxF
        return sparsity_lib.active(measured, threshold_F, keep)

    def at_step(self, step: int) -> None:
        """Evaluate the checkpoint of ``step``: the traced terms' values at that step."""
        if self.sparsity.active:
            self._coefs = self.sparsity.coefficients(step)

    def _compile(self, model: model_lib.Model, rule: str, keep_hidden: bool):
        def pass_fn(params, batch, stats, thresholds_NxF, coefs):
            masks = {}
            if rule in sparsity_lib.MASK_TARGETS:
                masks = {"thresholds": thresholds_NxF, "mask_target": rule}
            elif rule == "topk_global":
                masks = {"global_topk": self.topk_fraction}
            sp = self.sparsity.model_input(
                coefs, topk_k=self.topk_k if rule == "topk" else None, **masks)
            mean_loss, tokens, inter = model_loss(model, params, batch, sparsity=sp,
                                                  collect=("intermediates",),
                                                  loss_tile_len=self.cfg.train.loss_tile_len)
            acts, hiddens = model.ffn_intermediates(inter)
            valid_BxL = batch["weights"] > 0
            new_stats = [
                metrics_lib.stats_update(s, self._active(rule, a, h, thresholds_NxF[i], sp),
                                         a if rule == "zero" else None, valid_BxL)
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
        # Summed on the host in float64 in batch order, as each batch's float() was before.
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
            return self._run(self._dense, params, self._no_thresholds())
        if self._dense_keep is None:
            self._dense_keep = self._compile(self._model, "zero", True)
        need_gib = self.eval_tokens * self.d_ff * self.n_layers * 4 / 2**30
        store = HiddenStore(self.n_layers, spill=need_gib > self.options.max_cache_gib,
                            spill_root=spill_root)
        return self._run(self._dense_keep, params, self._no_thresholds(), store)

    def thresholded(self, params, thresholds_NxF, target: str) -> PassResult:
        """Sparse pass: neuron i of layer l dropped when |target|_i < thresholds_NxF[l, i]."""
        if target not in sparsity_lib.MASK_TARGETS:
            raise EvalError(f"mask target {target!r}; allowed: {list(sparsity_lib.MASK_TARGETS)}")
        return self._run(self._threshold[target], params, jnp.asarray(thresholds_NxF, jnp.float32))

    def fat(self, params, eps: float) -> PassResult:
        """FAT-ε sparse pass: active iff |σ(gate)| ≥ ε + 1e-18 (reference ``prune_fat``)."""
        threshold = sparsity_lib.fat_threshold(eps)
        return self.thresholded(params, np.full((self.n_layers, self.d_ff), threshold), "activation")

    def topk(self, params) -> PassResult:
        """Per-token top-k sparse pass (k = ``self.topk_k`` largest |σ(gate)|)."""
        return self._run(self._topk, params, self._no_thresholds())

    def topk_global(self, params) -> PassResult:
        """The reference's top-k sparse pass: per layer, the top ``k / d_ff`` share of |σ(gate)|
        over all tokens × neurons of each evaluation batch (``prune_topk``)."""
        return self._run(self._topk_global, params, self._no_thresholds())

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


# ------------------------------------------------------------------------------- CETT-PPL search
@dataclasses.dataclass
class CettPplSearch:
    cett: float
    target_ratio: float
    evaluations: list[tuple[float, float]]  # (c, perplexity ratio) in the order evaluated


def bisect_cett(ppl_ratio_at: Callable[[float], float], target_ratio: float,
                tolerance: float = 1e-3) -> CettPplSearch:
    """The reference's outer search (``calc_cett_for_target_ppl_ratio``) on c in [0, 1]:
    c goes up while the perplexity ratio is below the target; returns the bracket midpoint.

    The reference's tolerance is 1e-6 in its code; the paper uses 1e-3 (10 steps).
    """
    lo, hi = 0.0, 1.0
    evaluations = []
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        ratio = float(ppl_ratio_at(mid))
        evaluations.append((mid, ratio))
        if ratio < target_ratio:
            lo = mid
        else:
            hi = mid
    return CettPplSearch((lo + hi) / 2, target_ratio, evaluations)


def ppl_ratio(sparse_loss: float, dense_loss: float) -> float:
    """exp(loss_sparse − loss_dense): the sparse/dense perplexity ratio
    (docs/sparsity_metrics_and_laws.md §CETT-PPL)."""
    return math.exp(sparse_loss - dense_loss)


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
    ``batch_progress``: a progress bar over the batches of every pass (large models)."""
    steps = trained_run.select_steps(run.steps, checkpoints)
    cfg = run.cfg
    ev = Evaluator(cfg, options, batches)
    ev.batch_progress = batch_progress
    evaluators = _StepEvaluators(run, ev)
    t0 = time.perf_counter()
    warmup = run.warmup_steps
    want = set(options.metrics)
    target_ratio = 1 + options.ppl_p / 100
    say = print if progress else (lambda *a, **k: None)
    spill_root = None

    vanished: list[int] = []  # steps a live trainer deleted while they were being read
    with tempfile.TemporaryDirectory(prefix="sparsejax_eval_") as scratch:
        spill_root = pathlib.Path(scratch)
        cett_ppl = None
        if "cett_ppl" in want:
            post_warmup = [s for s in steps if s > warmup]
            if not post_warmup:
                raise EvalError(f"cett_ppl needs a checkpoint after warm-up (train.warmup_steps="
                                f"{warmup}); selected steps: {steps}")
            if options.cett_ppl_mode == "joint":
                joint = post_warmup[-options.joint_last:]
                say(f"CETT-PPL-{options.ppl_p:g}%: searching c jointly on steps {joint}")
                cett_ppl = _search_joint(evaluators, run, joint, target_ratio, spill_root, say,
                                         vanished)
            else:
                cett_ppl = {"mode": "per_checkpoint"}

        entries = []
        bar = _progress(_readable(run, steps, checkpoints, ev.mesh, vanished), progress, "checkpoints",
                        total=len(steps))
        for step_no, params, meta in bar:
            ev = evaluators.at(step_no)  # the model and sparsity this step was trained with
            ev.at_step(step_no)
            need_hidden = bool({"cett", "cett_ppl"} & want)
            dense = ev.dense(params, keep_hidden=need_hidden, spill_root=spill_root)
            entry = results_lib.CheckpointResult(
                step=step_no, tokens_seen=float(meta.get("tokens_seen", float("nan"))),
                dense_loss=dense.loss, histograms=_histograms(dense))
            res = entry.results
            if "zero" in want:
                res["zero"] = _report(dense, dense.loss)
            if "fat" in want:
                res["fat"] = _report(ev.fat(params, options.fat_eps), dense.loss, eps=options.fat_eps)
            if "topk" in want:
                res["topk"] = _report(ev.topk(params), dense.loss, k=ev.topk_k,
                                      fraction=ev.topk_fraction)
            if "topk_global" in want:
                res["topk_global"] = _report(ev.topk_global(params), dense.loss,
                                             fraction=ev.topk_fraction)
            if "cett" in want:
                sparse, t_layers = ev.cett_pass(params, dense.hidden, options.cett)
                res["cett"] = _report(sparse, dense.loss, cett=options.cett, thresholds=t_layers)
            if "cett_ppl" in want and step_no > warmup:
                if options.cett_ppl_mode == "joint":
                    c, search = cett_ppl["cett"], None
                else:
                    before = ev.forward_passes
                    search = bisect_cett(
                        lambda c: ppl_ratio(ev.cett_pass(params, dense.hidden, c)[0].loss, dense.loss),
                        target_ratio, options.tolerance)
                    c = search.cett
                sparse, t_layers = ev.cett_pass(params, dense.hidden, c)
                res["cett_ppl"] = _report(sparse, dense.loss, cett=c, p=options.ppl_p,
                                          target_ppl_ratio=target_ratio, thresholds=t_layers)
                if search is not None:
                    res["cett_ppl"].params.update(search_evaluations=search.evaluations,
                                                  search_forward_passes=ev.forward_passes - before)
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
        metrics=[m for m in METRICS if m in want], options=dataclasses.asdict(options),
        cett_ppl=cett_ppl, forward_passes=evaluators.forward_passes(), seconds=elapsed,
        checkpoints=entries, vanished_steps=vanished).to_dict()


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


def _search_joint(evaluators: _StepEvaluators, run: trained_run.TrainedRun, steps: list[int],
                  target_ratio: float, spill_root: pathlib.Path, say, vanished: list[int]) -> dict:
    """Bisection on c for the mean perplexity ratio over ``steps``
    (docs/sparsity_metrics_and_laws.md §CETT-PPL, joint mode), each step in its own settings.
    Steps a live trainer deletes meanwhile are left out of the search (noted)."""
    before = evaluators.forward_passes()
    cached = []
    for step_no in steps:
        ev = evaluators.at(step_no)
        try:
            params, _ = run.params(step_no, ev.mesh)
        except trained_run.StepVanished as err:
            _vanished_note(err, vanished)
            continue
        ev.at_step(step_no)
        dense = ev.dense(params, keep_hidden=True, spill_root=spill_root)
        cached.append((step_no, params, dense))

    def ratio_at(step_no, p, d, c):
        ev = evaluators.at(step_no)
        ev.at_step(step_no)
        return ppl_ratio(ev.cett_pass(p, d.hidden, c)[0].loss, d.loss)

    def mean_ratio(c: float) -> float:
        ratios = [ratio_at(s, p, d, c) for s, p, d in cached]
        value = float(np.mean(ratios))
        say(f"  c={c:.4f}: perplexity ratio {value:.5f} (target {target_ratio:.4f})")
        return value

    if not cached:
        raise trained_run.RunError(f"CETT-PPL joint search: steps {steps} were all deleted while "
                                   f"being read")
    steps = [s for s, _, _ in cached]
    search = bisect_cett(mean_ratio, target_ratio, evaluators.first.options.tolerance)
    return {"mode": "joint", "cett": search.cett, "joint_steps": steps,
            "target_ppl_ratio": target_ratio, "iterations": len(search.evaluations),
            "evaluations": search.evaluations,
            "forward_passes": evaluators.forward_passes() - before}
