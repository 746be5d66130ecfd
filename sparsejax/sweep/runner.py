"""Running a sweep locally: ``jobs`` runs at a time (default one after another), resumable, each
child stopped with the sweep.

For each run, ``train.py`` then ``eval.py`` run in subprocesses (workdir ``OUT/runs/<run>``,
output in ``train.log`` / ``eval.log`` there). A run whose training finished (marker
``sweep_train_done.json``, written only after train.py exits 0, holding the config) and whose
eval results are newer than the marker is skipped; a half-finished run is started again and
train.py resumes from its checkpoints. A failing run is recorded and the sweep goes on.

With ``jobs`` > 1, that many runs go at once, each child held to one intra-op thread
(:data:`SINGLE_THREAD_XLA_FLAGS`): the proxies' steps are too small for XLA to keep two threads
busy, so two single-threaded runs side by side use two cores better than one run with two. The
children's output then goes to their logs only (the sweep prints each run's progress lines); run
directories, markers and resume are the same as one at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from typing import Callable, Mapping, Sequence

from sparsejax import config as config_lib, configure, lifecycle, rundir
from sparsejax.eval_options import EvalOptions, to_argv
from sparsejax.sweep.resolved import REPO, ResolvedRun, config_path
from sparsejax.sweep.spec import Sweep

MARKER = rundir.SWEEP_MARKER
# XLA CPU flags holding a process to one intra-op thread (the children of a sweep with jobs > 1).
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def single_threaded(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with :data:`SINGLE_THREAD_XLA_FLAGS` added to its XLA_FLAGS."""
    flags = f"{env.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA_FLAGS}".strip()
    return {**env, "XLA_FLAGS": flags}


class _Children:
    """The sweep's live children, so that an interrupted sweep stops all of them (with jobs > 1 they
    run under worker threads, which a signal in the main thread does not unwind)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen] = set()
        self.stopping = threading.Event()

    def start(self, *args, **kwargs) -> subprocess.Popen | None:
        with self._lock:
            if self.stopping.is_set():
                return None
            proc = subprocess.Popen(*args, **kwargs)
            self._live.add(proc)
            return proc

    def done(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._live.discard(proc)

    def stop_all(self, grace_s: float = 60.0) -> None:
        """No new child starts; every live one gets SIGTERM (it checkpoints), then SIGKILL."""
        self.stopping.set()
        with self._lock:
            live = list(self._live)
        for proc in live:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in live:
            stop_process_group(proc, max(0.0, deadline - time.monotonic()))


def train_command(run: ResolvedRun, workdir, *, python: str = sys.executable,
                  script=REPO / "train.py", config: str | None = None) -> list[str]:
    """train.py's command line for one run (``config``: the config path as the host sees it)."""
    cmd = [python, str(script), "--config", config or str(config_path(run.config)),
           "--workdir", str(workdir), "--no-progress"]
    for override in run.overrides:
        cmd += ["--set", override]
    return cmd


def eval_command(run: ResolvedRun, workdir, options: EvalOptions, *, python: str = sys.executable,
                 script=REPO / "eval.py") -> list[str]:
    """eval.py's command line: every checkpoint, every option spelled out (eval_options.to_argv)."""
    return [python, str(script), "--workdir", str(workdir), "--checkpoints", "all",
            *to_argv(options), "--out", str(rundir.RunDir(str(workdir)).eval_results),
            "--no-progress"]


def tpu_script(sweep: Sweep, runs: Sequence[ResolvedRun], out: str) -> str:
    """Bash script launching the sweep on a TPU VM; OUT must be a path every host sees."""
    lines = ["#!/usr/bin/env bash",
             f"# sweep {sweep.name}: {len(runs)} runs. Set TPU_NAME and ZONE; {out} must be a path",
             "# every host sees (e.g. a bucket mounted with gcsfuse). Eval runs on worker 0 only.",
             "set -euo pipefail", ': "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"']
    for run in runs:
        workdir = f"{out}/runs/{run.name}"
        train = train_command(run, workdir, python="python", script="train.py", config=run.config)
        evaluate = eval_command(run, workdir, sweep.eval, python="python", script="eval.py")
        for worker, cmd in (("all", train), ("0", evaluate)):
            lines.append(f'gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker={worker} '
                         f'--command="cd sparsejax && {shlex.join(cmd)}"')
    return "\n".join(lines) + "\n"


def train_done(workdir: pathlib.Path, run: ResolvedRun) -> bool:
    """The run's training marker exists, is readable and names this config.

    A damaged marker (torn by a crash) counts as not done: training is started again, resumes
    from the run's checkpoints, and rewrites the marker. The saved config is read back through
    ``configure.from_dict`` first, so a field added to the code since (with its default) does not make
    a finished run look different and train again.
    """
    marker = rundir.RunDir(workdir).sweep_marker
    try:
        content = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(content, dict) or not isinstance(content.get("config"), dict):
        return False
    try:
        saved = config_lib.to_json_dict(configure.from_dict(content["config"]))
    except (config_lib.ConfigError, TypeError, ValueError):
        return False  # a config this code cannot read is not this run's
    return saved == run.config_dict


def eval_done(workdir: pathlib.Path, metrics: Sequence[str]) -> bool:
    """Eval results exist, are newer than the training marker and hold every wanted metric."""
    run = rundir.RunDir(workdir)
    results, marker = run.eval_results, run.sweep_marker
    if not (results.exists() and marker.exists()) or results.stat().st_mtime < marker.stat().st_mtime:
        return False
    try:
        return set(metrics) <= set(json.loads(results.read_text()).get("metrics", []))
    except json.JSONDecodeError:
        return False


def _finite(obj):
    """JSON-safe copy: NaN/Inf become null (strict JSON readers reject NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: pathlib.Path, obj) -> None:
    rundir.atomic_write(path, json.dumps(_finite(obj), indent=1, allow_nan=False))


def stop_process_group(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM a child's process group (the trainer saves a checkpoint), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _run_logged(cmd: list[str], log_path: pathlib.Path, *, echo: bool, env,
                children: _Children | None = None) -> int:
    """Run cmd from the repository root; output to log_path (and the console when echo).

    The child writes to the log file itself (not through a pipe to this process), so what it
    prints after the sweep is gone still reaches the log: the "stopped by SIGTERM ..." line of a
    trainer whose sweep was killed. The console copy is read back from the file.

    The child gets its own process group and is stopped with the sweep: when the sweep is
    interrupted or terminated, its SIGTERM reaches the trainer, which checkpoints and exits; if
    the sweep is killed outright, the kernel sends the child SIGTERM (``lifecycle.die_with_parent``).
    """
    with log_path.open("a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        start = log.tell()
        children = children or _Children()
        proc = children.start(cmd, cwd=REPO, env=lifecycle.child_env(dict(env)),
                              stdout=log, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
        if proc is None:  # the sweep is stopping
            return 128 + signal.SIGTERM
        tail = _Tail(log_path, start) if echo else None
        try:
            while tail is not None and proc.poll() is None:
                if not tail.echo():
                    time.sleep(0.2)
            return proc.wait()
        finally:
            stop_process_group(proc)
            children.done(proc)
            if tail is not None:  # what the child printed last (its stop line, when stopped)
                tail.echo()
                tail.close()


class _Tail:
    """The console copy of a log file: complete lines appended since ``start``, indented."""

    def __init__(self, path: pathlib.Path, start: int):
        self._file = path.open("r", errors="replace")
        self._file.seek(start)
        self._partial = ""

    def echo(self) -> bool:
        chunk = self._file.read()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        for line in lines:
            print(f"    {line}", flush=True)
        return bool(chunk)

    def close(self) -> None:
        if self._partial:
            print(f"    {self._partial}", flush=True)
        self._file.close()


@dataclasses.dataclass
class Outcome:
    run: str
    status: str  # "done", "skipped" or "failed"
    seconds: float = 0.0
    message: str = ""


def _run_one(sweep: Sweep, run: ResolvedRun, head: str, out: pathlib.Path, *, skip_eval: bool,
             progress: bool, env: Mapping[str, str], train_cmd: Callable, eval_cmd: Callable,
             log: Callable[[str], None], t_sweep: float, children: _Children) -> Outcome:
    """Train (unless its marker says done) and evaluate (unless its results are current) one run."""
    workdir = rundir.sweep_run(out, run.name).root
    workdir.mkdir(parents=True, exist_ok=True)
    need_train = not train_done(workdir, run)
    need_eval = not skip_eval and not eval_done(workdir, sweep.eval.metrics)
    if not (need_train or need_eval):
        log(f"{head}: complete, skipped")
        return Outcome(run.name, "skipped")
    t_run, failure = time.perf_counter(), ""
    files = rundir.RunDir(workdir)
    if need_train:
        log(f"{head}: training ({run.steps} steps, {run.params / 1e6:.2f}M non-embedding params)")
        t0 = time.perf_counter()
        cmd = train_cmd(run, workdir)
        rc = _run_logged(cmd, files.train_log, echo=progress, env=env, children=children)
        if rc == 0:
            write_json(files.sweep_marker, {"run": run.name, "config": run.config_dict, "command": cmd,
                                           "seconds": time.perf_counter() - t0,
                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        else:
            failure = f"train.py exited {rc} (log: {files.train_log})"
    if not failure and need_eval:
        log(f"{head}: evaluating ({','.join(sweep.eval.metrics)})")
        cmd = eval_cmd(run, workdir, sweep.eval)
        rc = _run_logged(cmd, files.eval_log, echo=progress, env=env, children=children)
        if rc != 0:
            failure = f"eval.py exited {rc} (log: {files.eval_log})"
    seconds = time.perf_counter() - t_run
    if failure:
        tail = (files.eval_log if "eval.py" in failure else files.train_log).read_text()
        log(f"{head}: FAILED: {failure}\n" + "".join(f"    | {x}\n" for x in tail.splitlines()[-8:]))
    log(f"{head}: {'failed' if failure else 'done'} in {seconds:.0f}s "
        f"(sweep elapsed {time.perf_counter() - t_sweep:.0f}s)")
    return Outcome(run.name, "failed" if failure else "done", seconds, failure)


def _whole_lines(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` that one thread at a time may call: ``print`` writes a message and its newline
    separately, so two runs' lines would otherwise interleave mid-line."""
    lock = threading.Lock()

    def say(message: str) -> None:
        with lock:
            log(message)
    return say


def execute(sweep: Sweep, runs: Sequence[ResolvedRun], out: pathlib.Path, *, skip_eval: bool = False,
            progress: bool = True, env: Mapping[str, str] | None = None,
            train_cmd: Callable = train_command, eval_cmd: Callable = eval_command,
            log: Callable[[str], None] = print, jobs: int = 1) -> list[Outcome]:
    """Train (and evaluate) each run, ``jobs`` at a time; a failure is recorded and the next run
    starts. Outcomes come back in the order of ``runs``.

    ``train_cmd(run, workdir)`` / ``eval_cmd(run, workdir, options)`` build the commands
    (injectable for tests). With ``jobs`` > 1 each child is single-threaded
    (:func:`single_threaded`) and its output is not echoed (it is in the run's logs).
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs} must be >= 1")
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    if jobs > 1:
        env, progress = single_threaded(env), False
    children, t_sweep = _Children(), time.perf_counter()
    log = _whole_lines(log)
    one = lambda i, run: _run_one(  # noqa: E731
        sweep, run, f"[{i}/{len(runs)}] {run.name}", out, skip_eval=skip_eval, progress=progress,
        env=env, train_cmd=train_cmd, eval_cmd=eval_cmd, log=log, t_sweep=t_sweep, children=children)
    if jobs == 1:
        return [one(i, run) for i, run in enumerate(runs, 1)]
    pool = futures.ThreadPoolExecutor(jobs, thread_name_prefix="sweep-run")
    try:
        pending = [pool.submit(one, i, run) for i, run in enumerate(runs, 1)]
        # Poll rather than block, so that SIGTERM/SIGINT reach the main thread promptly.
        while futures.wait(pending, timeout=0.5).not_done:
            pass
        return [f.result() for f in pending]
    except BaseException:
        children.stop_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
