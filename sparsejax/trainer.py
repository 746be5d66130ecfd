"""The training loop: check, compile, resume, step, log, evaluate, checkpoint, stop cleanly.

``train`` runs in this order, so that every mistake a user can make is caught before anything is
written and before any parameter is allocated:

1. the workdir is checked (writable, not a file) and, if it exists, locked (``rundir.RunLock``);
2. mesh, batch and sharding divisibility are checked; the data is loaded;
3. the state's bytes are checked against the device (or host) memory, then the train step is
   compiled ahead of time from abstract shapes and its compiled memory is checked too;
4. a warm start's parameters are read (a fresh run's); then the workdir is created and locked;
   library logging goes to ``train_debug.log`` in it;
5. the run's identity — its config and the fingerprint of its data and tokenizer
   (``data_identity``) — is checked against its checkpoints' (``--force`` overrides, naming what
   it overrides and recording the step from which that applies), or an earlier run is moved
   aside (``--no-resume``); the newest good checkpoint is restored;
6. the loop (:class:`_Loop`) runs.

Metrics stay on device as they are produced and are fetched together every ``log_every`` steps
(and before every checkpoint), so the host never blocks on the step it just dispatched. Every
step reports an in-graph ``finite`` flag (loss, gradient norm and updated parameters finite);
a checkpoint is written only after all steps up to it were finite, so a diverged run stops with
an error naming the step and the last good checkpoint, which stays good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import signal
import time
from typing import Any

import jax
import numpy as np

from sparsejax import (checkpointing, config as config_lib, data, data_identity, flops, lifecycle,
                       optim, plotting, resources, results, rundir, sharding, step, storage,
                       warm_start, writers)
from sparsejax.sparsity_plan import SparsityPlan

log = logging.getLogger(__name__)

# Fields that may change when a run is resumed (cadence and length, not what is trained).
RESUMABLE_CHANGES = {
    "name", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.keep_last", "train.keep_every", "train.checkpoint_steps", "train.peak_tflops",
    "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.rules",
    # the files it names are compared instead (``data_identity``): DIR and DIR/ are one run
    "data.text_files",
}


class TrainingError(RuntimeError):
    """The run failed while training (divergence, a checkpoint that could not be written)."""


class Stopped(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint of ``step`` was written (or already existed)."""

    def __init__(self, step: int, signum: int):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after saving a checkpoint at step {step}" if step
                         else f"stopped by {name} before the first step; nothing was saved")
        self.step, self.signum = step, signum
        self.exit_code = 128 + signum



def _flatten(cfg_dict: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in cfg_dict.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: dict, new: dict) -> list[str]:
    """Fields that differ between two config dicts and may not change on resume.

    A field the old config lacks (it was saved by a version without that field) counts as its
    default value, so adding a config field does not lock users out of their running runs; a
    config saved before fields moved (the sparsity section) is read in today's layout
    (``config.upgrade``).
    """
    a = _flatten(config_lib.upgrade(json.loads(json.dumps(old))))
    b = _flatten(json.loads(json.dumps(new)))
    defaults = _flatten(config_lib.to_json_dict(config_lib.Config()))
    a = {**{k: v for k, v in defaults.items() if k not in a}, **a}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


@dataclasses.dataclass
class RunSummary:
    workdir: pathlib.Path
    final_step: int
    final_loss: float
    final_activation_ratio: float | None
    plot_path: pathlib.Path | None
    resumed_from: int | None
    steps_run: int = 0


def _debug_log(workdir: pathlib.Path):
    name = rundir.RunDir.debug_log_name(jax.process_index())
    return lifecycle.debug_log(storage.local_log_path(workdir, name))


# ------------------------------------------------------------------------------- run identity
def check_identity(workdir: pathlib.Path, cfg: config_lib.Config, force: bool,
                   data_id: dict | None = None) -> list[str]:
    """Refuse to resume checkpoints of a different config or different data (ConfigError) unless
    ``force``; returns what ``force`` overrode (config fields and data changes, one phrase each),
    empty when nothing differed.

    The config is read by the one rule (``checkpointing.read_run_config``): the checkpoints'
    own copy first, so deleting or damaging ``config.json`` cannot make a ReLU run resume as a
    SiLU one. ``data_id`` (``data_identity.describe``) is compared with the fingerprint in the
    newest checkpoint's meta: files edited, added or removed, a replaced tokenizer file or a
    rebuilt TFDS dataset are named. ``data.text_files`` itself may change (``DIR`` vs ``DIR/``)
    when the files it resolves to are the same; a checkpoint without a fingerprint (saved by an
    older version) is compared by the option string alone.
    """
    run = rundir.RunDir(workdir)
    if not run.has_checkpoints():
        return []
    try:
        old, source = checkpointing.read_run_config(run)
        unknown = None if old is not None else f"no config in the checkpoints and no {run.config.name}"
    except checkpointing.RunConfigError as err:
        unknown = str(err)
    if unknown:
        if force:
            print(f"--force: resuming {workdir} although its checkpoints' config is unknown "
                  f"({unknown})", flush=True)
            return ["config unknown"]
        raise config_lib.ConfigError(
            f"{workdir} holds checkpoints but their config is unknown ({unknown}); pass --force "
            f"if they are this config's, or --no-resume to move them aside")
    new = config_lib.to_dict(cfg)
    diffs = config_differences(old, new)
    meta = checkpointing.meta_from_checkpoints(run.checkpoints) or {}
    old_id = meta.get("data_identity")
    if old_id is None and old.get("data", {}).get("text_files") != new["data"]["text_files"]:
        diffs.append("data.text_files")
    changed = data_identity.differences(old_id, data_id) if data_id is not None else []
    if (diffs or changed) and not force:
        what = []
        if diffs:
            what.append(f"a run with a different config ({source}; fields: {', '.join(diffs)})")
        if changed:
            what.append(f"a run on other data (changed since its last checkpoint: "
                        f"{'; '.join(changed)})")
        raise config_lib.ConfigError(
            f"{workdir} holds checkpoints of {' and of '.join(what)}; use another --workdir, "
            f"--no-resume to move that run aside, or --force to resume anyway")
    overridden = [f"{d}={_flatten(new).get(d)!r}" for d in diffs] + changed
    if overridden:
        print(f"--force: resuming {workdir} although it differs from its checkpoints: "
              f"{'; '.join(overridden)}", flush=True)
    return overridden


# ------------------------------------------------------------------------------------- the loop
class _Loop:
    """One training run's mutable state: the step loop, metric flushes, eval and saves."""

    def __init__(self, cfg, workdir, fns, train_step, dataset, ckpt, writer, mesh, *,
                 state, start_step, tokens_seen, progress, log_activations, forced=()):
        self.cfg, self.t, self.workdir = cfg, cfg.train, workdir
        self.fns, self.train_step, self.dataset = fns, train_step, dataset
        self.ckpt, self.writer, self.mesh = ckpt, writer, mesh
        self.state, self.step_no, self.tokens_seen = state, start_step, tokens_seen
        self.log_activations = log_activations
        self.forced = list(forced)  # each --force restart: its first step and what it overrode
        self.extra_saves = frozenset(self.t.checkpoint_steps)
        self.last_good = start_step if start_step else None
        self.last_saved = start_step if start_step else None
        self.pending: list[tuple[int, dict]] = []
        self.window_start = time.perf_counter()
        self.last_record: dict = {}
        self.lr_schedule = optim.learning_rate_schedule(self.t)
        self.flops_per_token = flops.train_flops_per_token(cfg.model, self.t.seq_len)
        self.peak = self.t.peak_tflops or flops.peak_tflops_for(jax.devices()[0].device_kind)
        self.bar = None
        if progress and jax.process_index() == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.t.steps, initial=start_step, desc=cfg.name, unit="step",
                            dynamic_ncols=True)

    def _where_good(self) -> str:
        # From the directory, not from memory: an asynchronous save that failed is not in it.
        with contextlib.suppress(checkpointing.CheckpointError):
            self.ckpt.wait()  # a save still in flight finishes first
        done = [s for s in checkpointing.finished_steps(self.ckpt.directory)
                if self.last_good is not None and s <= self.last_good]
        return f"step {done[-1]} in {self.ckpt.directory}" if done else "none"

    def flush(self, drain: bool = True) -> None:
        """Fetch pending metrics, check them, write them. Raises TrainingError on non-finite.

        Without ``drain`` the newest step stays pending, so the device always has a step queued
        while the host waits for the older ones.
        """
        ready, rest = (self.pending, []) if drain else (self.pending[:-1], self.pending[-1:])
        if not ready:
            return
        fetched = jax.device_get([m for _, m in ready])
        elapsed = time.perf_counter() - self.window_start
        tokens_window = sum(float(m["tokens"]) for m in fetched)
        tok_per_s = tokens_window / elapsed if elapsed > 0 else float("nan")
        records = []
        for (step_no, _), m in zip(ready, fetched):
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not bool(m["finite"]):
                self.writer.write(records)  # the good steps before it are kept
                raise TrainingError(
                    f"step {step_no} diverged (loss {loss}, gradient norm {grad_norm}; non-finite "
                    f"values in the loss, gradients or updated parameters); stopping without "
                    f"saving. Last good checkpoint: {self._where_good()}")
            self.tokens_seen += float(m["tokens"])
            record = results.TrainRecord(
                step=step_no, loss=loss, grad_norm=grad_norm,
                learning_rate=float(self.lr_schedule(step_no - 1)), tokens_seen=self.tokens_seen,
                tokens_per_s=tok_per_s,
                mfu=flops.mfu(tok_per_s, self.flops_per_token, jax.device_count(), self.peak),
                # the objective, its terms and their current values (the sparsity plan's)
                extra={key: int(m[key]) if key == "topk_k" else float(m[key])
                       for key in step.SPARSITY_METRICS if key in m})
            if "activation_ratio" in m:
                record.activation_ratio = float(m["activation_ratio"])
                record.activation_ratio_layers = [float(x) for x in m["activation_ratio_layers"]]
                record.dead_in_batch_layers = [float(x) for x in m["dead_in_batch_layers"]]
            records.append(record.to_dict())
        self.writer.write(records)
        self.last_record = records[-1]
        if self.bar is not None:
            self.bar.update(len(records))
            postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tok_per_s:,.0f}"}
            if "activation_ratio" in self.last_record:
                postfix["act"] = f"{self.last_record['activation_ratio']:.3f}"
            self.bar.set_postfix(postfix)
        self.pending = rest
        self.window_start = time.perf_counter()
        self.check_saves()  # a failed background save surfaces within one log window

    def evaluate(self) -> None:
        totals = jax.device_get([self.fns.evaluate(self.state, self.fns.plan.global_batch(b))
                                 for b in self.dataset.validation])
        tokens = sum(float(x["tokens"]) for x in totals)
        loss = sum(float(x["loss_sum"]) for x in totals) / tokens
        record = results.EvalRecord(step=self.step_no, eval_loss=loss)
        if self.log_activations:
            act = np.sum([x["act_sum_layers"] for x in totals], axis=0) / (tokens * self.cfg.model.d_ff)
            record.eval_activation_ratio = float(np.mean(act))
        self.writer.write([record.to_dict()])
        if self.bar is not None:
            self.bar.write(f"step {self.step_no}: eval loss {loss:.4f}" + (
                f", activation ratio {record.eval_activation_ratio:.4f}" if self.log_activations else ""))

    def save(self) -> None:
        """Checkpoint the current step (once), after checking every step up to it was finite."""
        self.flush()
        self.writer.sync()  # metrics up to this step are durable before the checkpoint is
        if self.last_saved == self.step_no:
            return
        states = _all_process_states(self.dataset.train.get_state())
        meta = {"data": states[0], "data_processes": states, "tokens_seen": self.tokens_seen,
                "seed": self.t.seed, "step": self.step_no, "config": config_lib.to_dict(self.cfg),
                "data_identity": self.dataset.identity, "forced": self.forced}
        try:
            self.ckpt.save(self.step_no, self.state, meta)
        except checkpointing.CheckpointError as err:
            raise TrainingError(f"{err}. Last good checkpoint: {self._where_good()}") from None
        self.last_good = self.last_saved = self.step_no

    def check_saves(self) -> None:
        try:
            self.ckpt.check_for_errors()
        except checkpointing.CheckpointError as err:
            self.last_good = (self.ckpt.in_flight or 1) - 1  # the failed one is not good
            raise TrainingError(f"{err}. Last good checkpoint: {self._where_good()}") from None

    def run(self, stop: lifecycle.StopSignals) -> None:
        t = self.t
        for step_no in range(self.step_no + 1, t.steps + 1):
            if self._stop_requested(stop, step_no):
                break
            batch = self.fns.plan.global_batch(next(self.dataset.train))
            self.state, metrics = self.train_step(self.state, batch)
            self.step_no = step_no
            for leaf in jax.tree.leaves(metrics):
                leaf.copy_to_host_async()  # start the transfer now; fetched at the next flush
            self.pending.append((step_no, metrics))
            do_eval = step_no % t.eval_every == 0 or step_no == t.steps
            do_save = (step_no % t.checkpoint_every == 0 or step_no == t.steps
                       or step_no in self.extra_saves)
            if do_eval or do_save:
                # One draining fetch: a non-draining one just before would leave a window of
                # one already-finished step and report a bogus tokens/s for it.
                self.flush()
                if do_eval:
                    self.evaluate()
                if do_save:
                    self.save()
                self.window_start = time.perf_counter()  # tokens/s measures training only
            elif step_no % t.log_every == 0:
                self.flush(drain=False)
        self.flush()
        if stop.signum is not None:
            stop.stopping()  # the watchdog stands down: the loop is not blocked
            if self.step_no > 0:
                self.save()
                self.wait_saves()
            raise Stopped(self.step_no, stop.signum)

    def _stop_requested(self, stop: lifecycle.StopSignals, step_no: int) -> bool:
        """One process stops at once. Several stop together, at the first ``log_every`` boundary
        after any of them got the signal (a tiny all-gather of the flags there): a process that
        stopped alone would leave the others blocked in the next step's collectives."""
        if jax.process_count() == 1:
            return stop.signum is not None
        if (step_no - 1) % self.t.log_every:
            return False
        from jax.experimental import multihost_utils

        signum = int(np.max(multihost_utils.process_allgather(np.int32(stop.signum or 0))))
        if signum and stop.signum is None:
            stop.signum = signum  # another process was signalled: save and stop with it
        return bool(signum)

    def wait_saves(self) -> None:
        try:
            self.ckpt.wait()
        except checkpointing.CheckpointError as err:
            self.last_good = (self.ckpt.in_flight or 1) - 1
            raise TrainingError(f"{err}. Last good checkpoint: {self._where_good()}") from None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _all_process_states(state: dict) -> list[dict]:
    """Every process's data-iterator state, in process order (all processes call this).

    Process 0 alone writes the checkpoint's meta, but a grain iterator's state is its own
    process's: each packs a different share of the documents, so a resumed process needs its own.
    """
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(blobs[i, :sizes[i]])) for i in range(len(sizes))]


def _own_data_state(meta: dict, cfg: config_lib.Config) -> dict:
    """This process's data-iterator state from a checkpoint's meta."""
    states = meta.get("data_processes")
    if states is None:  # written before per-process states were kept
        return meta["data"]
    if len(states) != jax.process_count() and cfg.data.source != "embedded":
        # Embedded-corpus states are the step on every process; grain shards records by process.
        raise config_lib.ConfigError(
            f"the checkpoint's data iterators are those of {len(states)} processes; "
            f"data.source={cfg.data.source!r} shards its records by process, so resume with "
            f"{len(states)} processes, not {jax.process_count()}")
    return states[min(jax.process_index(), len(states) - 1)]


# ------------------------------------------------------------------------------------ train()
def _prepare(cfg: config_lib.Config, log_activations: bool):
    """Everything that can fail on a bad config, with nothing allocated or written."""
    shards = sharding.plan(cfg.mesh)
    shards.check_batch(cfg.train.batch_size, cfg.train.grad_accum)
    mesh = shards.mesh
    # A warm start whose shapes do not fit is refused here (metadata only), before compiling.
    warm = warm_start.plan(cfg, mesh)
    fns = step.make_step_functions(cfg, mesh, optim.make_optimizer(cfg),
                                   log_activations=log_activations)
    budget, limit_name = resources.device_budget()
    resources.check_state_fits(fns.abstract_state, budget, limit_name)
    try:
        dataset = data.Dataset(cfg, jax.process_index(), jax.process_count())
        dataset.identity = data_identity.describe(cfg, dataset.tokenizer)
        dataset.validation = dataset.validation[:sharding.agreed_minimum(len(dataset.validation))]
    except data.DataError as err:
        raise config_lib.ConfigError(str(err)) from None
    except OSError as err:  # a file removed or unreadable between the two reads
        raise config_lib.ConfigError(f"data: cannot read {err.filename} "
                                     f"({err.strerror or err})") from None
    t0 = time.perf_counter()
    # AOT compile from abstract shapes: shape or memory problems surface before the first step.
    train_step = fns.train.lower(
        fns.abstract_state, fns.plan.batch_shapes(cfg.train.batch_size, cfg.train.seq_len)).compile()
    compile_s = time.perf_counter() - t0
    need = resources.check_compiled_fits(train_step, budget, limit_name)
    return mesh, fns, dataset, train_step, compile_s, need, warm


def train(cfg: config_lib.Config, workdir: str | pathlib.Path, *, resume: bool = True,
          force: bool = False, progress: bool = True, log_activations: bool = True,
          stop_timeout_s: float | None = lifecycle.DEFAULT_STOP_TIMEOUT_S) -> RunSummary:
    """Train ``cfg`` in ``workdir`` (module docstring). ``stop_timeout_s``: after SIGTERM /
    SIGINT, exit with one line if the loop has not reached a step boundary this much later
    (``lifecycle.StopSignals``; None: wait for ever)."""
    workdir = storage.path(workdir)  # local, or gs:// (see sparsejax.storage)
    is_main = jax.process_index() == 0
    rundir.check_writable_dir(workdir, "--workdir")
    lock = rundir.run_lock(workdir) if is_main else None
    # Signals are deferred from here on: one that arrives while compiling stops the run before
    # its first step, with nothing half-written.
    with lifecycle.StopSignals(stop_timeout_s) as stop:
        try:
            if lock is not None and workdir.is_dir():
                lock.acquire()  # a second trainer is refused before it compiles anything
            mesh, fns, dataset, train_step, compile_s, need, warm = _prepare(cfg, log_activations)
            warm_params = None
            if warm is not None and not (resume and rundir.RunDir(workdir).has_checkpoints()):
                # A fresh run: its parameters must load before anything of it is written.
                warm_params = warm_start.load(warm, cfg, fns.state_shardings["params"])
            workdir.mkdir(parents=True, exist_ok=True)
            if lock is not None and not lock.held:
                lock.acquire()
            with _debug_log(workdir):
                return _train_in(cfg, workdir, mesh, fns, dataset, train_step, compile_s, need,
                                 stop, resume=resume, force=force, progress=progress,
                                 log_activations=log_activations, warm=warm,
                                 warm_params=warm_params)
        finally:
            if lock is not None:
                lock.release()


def _train_in(cfg, workdir, mesh, fns, dataset, train_step, compile_s, need, stop, *, resume,
              force, progress, log_activations, warm=None, warm_params=None) -> RunSummary:
    is_main = jax.process_index() == 0
    if not resume and is_main:
        moved = rundir.move_previous_run(workdir)
        if moved is not None:
            print(f"--no-resume: moved the previous run's files to {moved}")
    forced = check_identity(workdir, cfg, force, dataset.identity) if resume else []
    t = cfg.train
    rows = getattr(dataset.train, "rows", None)
    log.info("data: process %d of %d loads rows %s of each global batch of %d",
             jax.process_index(), jax.process_count(),
             f"{rows.start}:{rows.stop}" if isinstance(rows, slice)
             else f"(grain shard: {getattr(dataset.train, 'shard', '?')})", t.batch_size)
    log.info("validation: %d batches on every process (this process's share of the records "
             "gave %d)", len(dataset.validation), dataset.own_validation_batches)
    run = rundir.RunDir(workdir)
    ckpt = checkpointing.Checkpointer(run.checkpoints, keep_last=t.keep_last,
                                      keep_every=t.keep_every, keep_steps=t.checkpoint_steps)
    writer = writers.MetricsWriter(workdir, enabled=is_main)
    loop = None
    try:
        restored = ckpt.restore_latest(fns.abstract_state) if resume else None
        if is_main:
            rundir.atomic_write(run.config, json.dumps(config_lib.to_dict(cfg), indent=2))
        history: list[dict] = []
        if restored is not None:
            start_step, state, meta = restored
            dataset.train.set_state(_own_data_state(meta, cfg))
            tokens_seen = float(meta["tokens_seen"])
            history = list(meta.get("forced", []))
            if forced:
                # Checkpoints up to start_step keep the settings they were trained with (their
                # own meta's config); these apply from the next step on.
                history.append({"applies_from_step": start_step + 1, "overridden": forced})
                print(f"--force: the new settings apply from step {start_step + 1}; checkpoints "
                      f"up to step {start_step} keep their own", flush=True)
            print(f"resumed from {ckpt.directory} at step {start_step}")
        else:
            start_step, tokens_seen = 0, 0.0
            state = fns.init(jax.random.key(t.seed))
            if warm is not None:
                # Parameters only: the optimizer state (zero moments) and step 0 stay fresh.
                state["params"] = (warm_params if warm_params is not None else
                                   warm_start.load(warm, cfg, fns.state_shardings["params"]))
                print(f"warm start: parameters of {warm.directory} step {warm.step} "
                      f"({warm.source_cfg.name}, model.activation="
                      f"{warm.source_cfg.model.activation!r})", flush=True)
        writer.truncate_after(start_step)
        if is_main:
            counts = flops.param_counts(cfg.model)
            mem = f", {resources.human_bytes(need)} per device" if need else ""
            print(f"{cfg.name}: {counts.total / 1e6:.2f}M parameters ({counts.non_embedding / 1e6:.2f}M "
                  f"non-embedding), mesh {dict(mesh.shape)}, compiled in {compile_s:.1f}s{mem}",
                  flush=True)
        loop = _Loop(cfg, workdir, fns, train_step, dataset, ckpt, writer, mesh, state=state,
                     start_step=start_step, tokens_seen=tokens_seen, progress=progress,
                     log_activations=log_activations, forced=history)
        loop.run(stop)
        loop.wait_saves()
    finally:
        if loop is not None:
            loop.close()
        try:
            # Save errors were raised by loop.wait_saves(); here they would mask the first error.
            with contextlib.suppress(checkpointing.CheckpointError):
                ckpt.close()
        finally:
            writer.close()
    return _summarize(cfg, workdir, loop, restored, is_main, log_activations)


def _summarize(cfg, workdir, loop, restored, is_main, log_activations) -> RunSummary:
    run = rundir.RunDir(workdir)
    train = results.read_training(run.metrics)[0] if is_main and run.metrics.exists() else {}
    records = [train[s] for s in sorted(train)]
    plot_path = None
    if is_main and log_activations and records:
        plot_path = plotting.plot_activation_ratio(records, run.plot,
                                                   title=f"{cfg.name}: FFN activation ratio",
                                                   stages=SparsityPlan.of(cfg).stage_boundaries())
    last = records[-1].to_dict() if records else loop.last_record
    start = restored[0] if restored is not None else 0
    return RunSummary(workdir, loop.step_no, last.get("loss", float("nan")),
                      last.get("activation_ratio"), plot_path,
                      restored[0] if restored is not None else None, loop.step_no - start)
