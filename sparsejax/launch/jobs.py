"""Sweep runs as cloud jobs: one job per run, idempotent, resumable.

``python -m sparsejax.sweep SPEC --out gs://BUCKET/sweeps/NAME --launch xpk --launch-opts
"--tpu-type v5e-256 --cluster C --image IMG"`` calls :func:`submit_sweep`: for every run of the
sweep whose training marker (``sweep_train_done.json`` in ``OUT/runs/<run>``) is missing or
names another config, one job is submitted; finished runs are skipped. Re-running the same
command therefore only submits what is left; a job that died resumes from its checkpoints.

A job runs :func:`run_job` (``python -m sparsejax.launch job``) on every host: ``train.py``
with the run's arguments, then, on host 0 only and only after ``train.py`` exits 0, the run's
marker (the same content the local sweep writes), so ``--collect-only`` and the next submission
see the run as done. Engines:

* ``xpk``: ``xpk workload create --workload <sweep>-<run>``; xpk refuses a second workload of the
  same name while one exists, so a run is never trained twice at once.
* ``tpu-vm``: one slice per run (``<prefix>-<run>``): created if absent, code copied, requirements
  installed, training started in the background on every worker unless a trainer of that
  workdir is already running there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

from sparsejax.launch import cloud, targets


def job_name(prefix: str, run: str) -> str:
    """A Kubernetes/TPU-VM name from the sweep and run names (lower case, '-', ≤ 40 chars)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{run}".lower()).strip("-")
    name = re.sub(r"-+", "-", name)
    if len(name) > 40:  # keep it unique: a short hash of the full name at the end
        import hashlib

        name = f"{name[:33].rstrip('-')}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"
    if not name[:1].isalpha():
        name = "r" + name[:39]
    return name


def run_train_args(run, workdir: str) -> list[str]:
    """``train.py`` arguments of a resolved sweep run, with repository-relative config paths."""
    args = ["--config", run.config, "--workdir", workdir, "--no-progress"]
    for override in run.overrides:
        args += ["--set", override]
    return args


def job_program(run, marker: str) -> list[str]:
    """The wrapper every host of a sweep job runs; train.py's arguments follow it."""
    return ["python3", "-m", "sparsejax.launch", "job", "--run-name", run.name, "--marker", marker, "--"]


def parse_opts(engine: str, opts: str) -> argparse.Namespace:
    """``--launch-opts`` of target ``engine`` by the launcher table (:mod:`.targets`)."""
    targets.get(engine, sweep=True)  # an unknown engine is named before its options are read
    try:
        words = shlex.split(opts or "")
    except ValueError as err:  # unbalanced quotes
        raise cloud.CloudError(f"--launch-opts={opts!r}: {err} (quote it as one shell word, e.g. "
                               f"--launch-opts '--tpu-type v5e-16 --zone us-west4-a')") from None
    return targets.parse_sweep_opts(engine, words)


def submit_sweep(engine: str, opts: str, sweep_name: str, runs: Sequence, out: str,
                 done: Callable[[object, object], bool], marker: str, *,
                 execute: Callable[[list[str]], int] | None = None, log=print) -> int:
    """Submit one job per unfinished run; returns 0, or 1 if a submission failed.

    ``done(workdir, run)`` is the sweep's own marker check; ``execute`` runs one argv (default:
    subprocess), only with ``--run`` in ``opts``. Raises CloudError for bad input, before any job.
    """
    from sparsejax import rundir, storage

    ns = parse_opts(engine, opts)
    target = targets.TARGETS[engine]
    num_slices = getattr(ns, "num_slices", 1)
    if not storage.is_remote(out):
        raise cloud.CloudError(f"--out={out!r} must be a gs:// URL for --launch {engine}: every host "
                               f"writes there and the sweep reads the markers from there")
    sl = cloud.parse_slice(ns.tpu_type)
    for run in runs:
        cloud.check_batch(sl, num_slices, int(run.config_dict["train"]["batch_size"]))
    if ns.run:
        targets.need(target.tool)
    execute = execute or (lambda argv: subprocess.run(argv).returncode)
    root = storage.path(out)
    try:  # the markers are read from the bucket: fail before anything is printed or submitted
        root.exists()
    except Exception as err:
        hint = "; pip install gcsfs (and log in: gcloud auth application-default login)"
        raise cloud.CloudError(f"cannot read --out={out} ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}){hint}") from None
    failed = 0
    log(f"# sweep {sweep_name}: {len(runs)} runs on {engine}, {num_slices} × {sl.accelerator_type} "
        f"({sl.hosts} host(s) × {sl.chips_per_host} chips) each; out {out}")
    for run in runs:
        workdir = rundir.sweep_run(root, run.name).root
        if done(workdir, run):
            log(f"# {run.name}: trained (marker in {workdir}), skipped")
            continue
        name = job_name(sweep_name, run.name)
        wd = os.fspath(workdir)
        program, train_args = job_program(run, marker), run_train_args(run, wd)
        cmds = target.sweep_job(ns, sl, name, train_args, program, wd)
        log(f"# {run.name}: submit as {name}")
        for argv in cmds:
            log(shlex.join(argv))
            if ns.run:
                rc = execute(argv)
                if rc != 0:
                    log(f"# {run.name}: {argv[0]} exited {rc}; next run")
                    failed += 1
                    break
    return 1 if failed else 0


# ------------------------------------------------------------------------------ the job itself
def host_index(environ=None) -> int:
    """0 on the host that writes the marker: TPU VM / GKE worker 0 of slice 0."""
    env = os.environ if environ is None else environ
    for key in ("TPU_WORKER_ID", "JOB_COMPLETION_INDEX", "MEGASCALE_SLICE_ID"):
        value = env.get(key, "0") or "0"
        if value.isdigit() and int(value) != 0:
            return int(value)
    return 0


def run_job(run_name: str, marker: str, train_args: Sequence[str], *,
            python: str = sys.executable, environ=None) -> int:
    """train.py, then (host 0, exit 0) the sweep marker with the config train.py wrote."""
    from sparsejax import rundir, storage

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workdir", required=False)
    ns, _ = parser.parse_known_args(train_args)
    if not ns.workdir:
        raise cloud.CloudError("the train.py arguments after '--' must include --workdir")
    train = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "train.py")
    t0 = time.time()
    rc = subprocess.run([python, train, *train_args]).returncode
    if rc != 0 or host_index(environ) != 0:
        return rc
    workdir = storage.path(ns.workdir)
    config = json.loads(rundir.RunDir(workdir).config.read_text())
    rundir.atomic_write(workdir / marker, json.dumps({
        "run": run_name, "config": config, "command": ["train.py", *train_args],
        "seconds": time.time() - t0, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    return 0
