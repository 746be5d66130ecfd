"""The training loop: resume, step, log, evaluate, checkpoint, stop cleanly.

Metrics stay on device as they are produced and are fetched together every ``log_every`` steps
(and before every checkpoint), so the host never blocks on the step it just dispatched.
Before any checkpoint is written, the fetched losses are checked: a NaN/Inf loss stops the run
with an error naming the step and the last good checkpoint, which is never overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import signal
import time
from typing import Any

import jax
import numpy as np

from sparsejax import checkpointing, config as config_lib, data, flops, optim, sharding, step, writers

log = logging.getLogger(__name__)

# Fields that may change when a run is resumed (cadence and length, not what is trained).
RESUMABLE_CHANGES = {
    "name", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.keep_last", "train.keep_every", "train.peak_tflops",
    "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.rules",
}
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a preempted job


class TrainingError(RuntimeError):
    pass


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of ``step`` was written."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM after saving a checkpoint at step {step}")
        self.step = step


def _flatten(cfg_dict: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in cfg_dict.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: dict, new: dict) -> list[str]:
    """Fields that differ between two config dicts and may not change on resume."""
    a, b = _flatten(old), _flatten(json.loads(json.dumps(new)))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


@dataclasses.dataclass
class RunSummary:
    workdir: pathlib.Path
    final_step: int
    final_loss: float
    final_activation_ratio: float | None
    plot_path: pathlib.Path | None
    resumed_from: int | None


class _SigtermFlag:
    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.raised = True
        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. inside a notebook worker)
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_workdir_config(workdir: pathlib.Path, cfg: config_lib.Config, has_checkpoints: bool,
                          force: bool) -> None:
    path = workdir / "config.json"
    new = config_lib.to_dict(cfg)
    if path.exists() and has_checkpoints:
        diffs = config_differences(json.loads(path.read_text()), new)
        if diffs and not force:
            raise TrainingError(
                f"{workdir} holds checkpoints of a run with a different config (fields: "
                f"{', '.join(diffs)}); use another --workdir, or pass --force to resume anyway")
    if jax.process_index() == 0:
        path.write_text(json.dumps(new, indent=2))


def train(cfg: config_lib.Config, workdir: str | pathlib.Path, *, resume: bool = True,
          force: bool = False, progress: bool = True, log_activations: bool = True) -> RunSummary:
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    t = cfg.train

    mesh = sharding.make_mesh(cfg.mesh)
    tx = optim.make_optimizer(t)
    fns = step.make_step_functions(cfg, mesh, tx, log_activations=log_activations)
    dataset = data.Dataset(cfg, jax.process_index(), jax.process_count())
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints", keep_last=t.keep_last,
                                      keep_every=t.keep_every)
    _check_workdir_config(workdir, cfg, bool(ckpt.all_steps()), force)
    writer = writers.MetricsWriter(workdir, enabled=is_main)

    restored = ckpt.restore_latest(fns.abstract_state) if resume else None
    if restored is not None:
        start_step, state, meta = restored
        dataset.train.set_state(meta["data"])
        tokens_seen = float(meta["tokens_seen"])
        writer.truncate_after(start_step)
        print(f"resumed from {ckpt.directory} at step {start_step}")
    else:
        if ckpt.all_steps() and resume:
            raise TrainingError(f"no checkpoint in {ckpt.directory} could be restored")
        start_step, tokens_seen = 0, 0.0
        state = fns.init(jax.random.key(t.seed))
        writer.truncate_after(0)
    last_good = start_step if restored is not None else None

    # AOT compile: shape or memory problems surface before the first step, not hours in.
    batch_spec = {
        "inputs": jax.ShapeDtypeStruct((t.batch_size, t.seq_len), np.int32, sharding=sharding.batch_sharding(mesh)),
        "targets": jax.ShapeDtypeStruct((t.batch_size, t.seq_len), np.int32, sharding=sharding.batch_sharding(mesh)),
        "weights": jax.ShapeDtypeStruct((t.batch_size, t.seq_len), np.float32, sharding=sharding.batch_sharding(mesh)),
    }
    t0 = time.perf_counter()
    train_step = fns.train.lower(fns.abstract_state, batch_spec).compile()
    compile_s = time.perf_counter() - t0

    flops_per_token = flops.train_flops_per_token(cfg.model, t.seq_len)
    peak = t.peak_tflops or flops.peak_tflops_for(jax.devices()[0].device_kind)
    n_devices = jax.device_count()
    if is_main:
        counts = flops.param_counts(cfg.model)
        print(f"{cfg.name}: {counts.total / 1e6:.2f}M parameters ({counts.non_embedding / 1e6:.2f}M "
              f"non-embedding), mesh {dict(mesh.shape)}, compiled in {compile_s:.1f}s")

    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=start_step, desc=cfg.name, unit="step", dynamic_ncols=True)

    pending: list[tuple[int, dict]] = []
    window_start = time.perf_counter()
    last_record: dict = {}

    def flush(drain: bool = True) -> None:
        """Fetch pending metrics, check them, write them. Raises on NaN/Inf.

        Without ``drain`` the newest step stays pending, so the device always has a step queued
        while the host waits for the older ones.
        """
        nonlocal pending, window_start, tokens_seen, last_record
        ready, rest = (pending, []) if drain else (pending[:-1], pending[-1:])
        if not ready:
            return
        fetched = jax.device_get([m for _, m in ready])
        elapsed = time.perf_counter() - window_start
        tokens_window = sum(float(m["tokens"]) for m in fetched)
        tok_per_s = tokens_window / elapsed if elapsed > 0 else float("nan")
        records = []
        for (step_no, _), m in zip(ready, fetched):
            loss = float(m["loss"])
            if not math.isfinite(loss):
                where = (f"step {last_good} in {ckpt.directory}" if last_good is not None
                         else "none (no checkpoint was written)")
                raise TrainingError(f"loss is {loss} at step {step_no}; stopping without saving. "
                                    f"Last good checkpoint: {where}")
            tokens_seen += float(m["tokens"])
            record = {"step": step_no, "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                      "grad_norm": float(m["grad_norm"]),
                      "learning_rate": float(lr_schedule(step_no - 1)), "tokens_seen": tokens_seen,
                      "tokens_per_s": tok_per_s,
                      "mfu": flops.mfu(tok_per_s, flops_per_token, n_devices, peak)}
            if "activation_ratio" in m:
                record["activation_ratio"] = float(m["activation_ratio"])
                record["activation_ratio_layers"] = [float(x) for x in m["activation_ratio_layers"]]
                record["dead_in_batch_layers"] = [float(x) for x in m["dead_in_batch_layers"]]
            records.append(record)
        writer.write(records)
        last_record = records[-1]
        if bar is not None:
            bar.update(len(records))
            postfix = {"loss": f"{last_record['loss']:.3f}", "tok/s": f"{tok_per_s:,.0f}"}
            if "activation_ratio" in last_record:
                postfix["act"] = f"{last_record['activation_ratio']:.3f}"
            bar.set_postfix(postfix)
        pending = rest
        window_start = time.perf_counter()

    def evaluate(step_no: int) -> None:
        totals = [fns.evaluate(state, sharding.global_batch(b, mesh)) for b in dataset.validation]
        totals = jax.device_get(totals)
        tokens = sum(float(x["tokens"]) for x in totals)
        loss = sum(float(x["loss_sum"]) for x in totals) / tokens
        record = {"step": step_no, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
        if log_activations:
            act = np.sum([x["act_sum_layers"] for x in totals], axis=0) / (tokens * cfg.model.d_ff)
            record["eval_activation_ratio"] = float(np.mean(act))
        writer.write([record])
        if bar is not None:
            bar.write(f"step {step_no}: eval loss {loss:.4f}"
                      + (f", activation ratio {record['eval_activation_ratio']:.4f}" if log_activations else ""))

    def save(step_no: int, *, force_save: bool = False) -> None:
        nonlocal last_good
        flush()  # NaN check before anything is written
        meta = {"data": dataset.train.get_state(), "tokens_seen": tokens_seen, "seed": t.seed,
                "step": step_no}
        if ckpt.save(step_no, state, meta, force=force_save):
            last_good = step_no

    lr_schedule = optim.learning_rate_schedule(t)
    try:
        with _SigtermFlag() as sigterm:
            for step_no in range(start_step + 1, t.steps + 1):
                batch = sharding.global_batch(next(dataset.train), mesh)
                state, metrics = train_step(state, batch)
                for leaf in jax.tree.leaves(metrics):
                    leaf.copy_to_host_async()  # start the transfer now; fetched at the next flush
                pending.append((step_no, metrics))
                do_eval = step_no % t.eval_every == 0 or step_no == t.steps
                do_save = step_no % t.checkpoint_every == 0 or step_no == t.steps
                if do_eval or do_save:
                    # One draining fetch: a non-draining one just before would leave a window of
                    # one already-finished step and report a bogus tokens/s for it.
                    flush()
                    if do_eval:
                        evaluate(step_no)
                    if do_save:
                        save(step_no)
                    window_start = time.perf_counter()  # tokens/s measures training, not eval/saving
                elif step_no % t.log_every == 0:
                    flush(drain=False)
                if sigterm.raised:
                    save(step_no, force_save=True)
                    ckpt.wait()
                    raise Preempted(step_no)
            flush()
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        writer.close()

    plot_path = None
    final_ratio = last_record.get("activation_ratio")
    if is_main and log_activations:
        records = [r for r in writers.read_jsonl(writer.path) if "loss" in r]
        if records:
            plot_path = writers.plot_activation_ratio(records, workdir / "activation_ratio.png",
                                                      title=f"{cfg.name}: FFN activation ratio")
            final_ratio = records[-1].get("activation_ratio")
    final_loss = last_record.get("loss", float("nan"))
    return RunSummary(workdir, t.steps, final_loss, final_ratio, plot_path,
                      restored[0] if restored is not None else None)
