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

from sparsejax.launch import cloud

ENGINES = ("tpu-vm", "xpk")


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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, raised: the sweep prints it and exits 2
        raise cloud.CloudError(f"--launch-opts for {self.prog.split()[1]}: {message}")


def _opts_parser(engine: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"--launch {engine} --launch-opts", add_help=False)
    p.add_argument("--tpu-type", required=True)
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--project")
    p.add_argument("--zone", required=engine == "tpu-vm")
    if engine == "xpk":
        p.add_argument("--cluster", required=True)
        p.add_argument("--image", required=True)
        p.add_argument("--max-restarts", type=int, default=3)
    else:
        p.add_argument("--spot", action="store_true")
    p.add_argument("--run", action="store_true", help="execute (default: print only)")
    return p


def parse_opts(engine: str, opts: str) -> argparse.Namespace:
    if engine not in ENGINES:
        raise cloud.CloudError(f"--launch={engine!r}; allowed values: ['local', 'tpu-vm', 'xpk']")
    try:
        words = shlex.split(opts or "")
    except ValueError as err:  # unbalanced quotes
        raise cloud.CloudError(f"--launch-opts={opts!r}: {err} (quote it as one shell word, e.g. "
                               f"--launch-opts '--tpu-type v5e-16 --zone us-west4-a')") from None
    ns = _opts_parser(engine).parse_args(words)
    if ns.num_slices < 1:
        raise cloud.CloudError(f"--num-slices={ns.num_slices}; allowed values: integers >= 1")
    if getattr(ns, "max_restarts", 0) < 0:
        raise cloud.CloudError(f"--max-restarts={ns.max_restarts}; allowed values: integers >= 0")
    return ns


def submit_sweep(engine: str, opts: str, sweep_name: str, runs: Sequence, out: str,
                 done: Callable[[object, object], bool], marker: str, *,
                 execute: Callable[[list[str]], int] | None = None, log=print) -> int:
    """Submit one job per unfinished run; returns 0, or 1 if a submission failed.

    ``done(workdir, run)`` is the sweep's own marker check; ``execute`` runs one argv (default:
    subprocess), only with ``--run`` in ``opts``. Raises CloudError for bad input, before any job.
    """
    from sparsejax import rundir, storage

    ns = parse_opts(engine, opts)
    if not storage.is_remote(out):
        raise cloud.CloudError(f"--out={out!r} must be a gs:// URL for --launch {engine}: every host "
                               f"writes there and the sweep reads the markers from there")
    sl = cloud.parse_slice(ns.tpu_type)
    for run in runs:
        cloud.check_batch(sl, ns.num_slices, int(run.config_dict["train"]["batch_size"]))
    if ns.run:
        tool = "xpk" if engine == "xpk" else "gcloud"
        import shutil

        if shutil.which(tool) is None:
            raise cloud.CloudError(f"{tool} is not on PATH; install it, or omit --run to print the commands")
    execute = execute or (lambda argv: subprocess.run(argv).returncode)
    root = storage.path(out)
    try:  # the markers are read from the bucket: fail before anything is printed or submitted
        root.exists()
    except Exception as err:
        hint = "; pip install gcsfs (and log in: gcloud auth application-default login)"
        raise cloud.CloudError(f"cannot read --out={out} ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}){hint}") from None
    failed = 0
    log(f"# sweep {sweep_name}: {len(runs)} runs on {engine}, {ns.num_slices} × {sl.accelerator_type} "
        f"({sl.hosts} host(s) × {sl.chips_per_host} chips) each; out {out}")
    for run in runs:
        workdir = rundir.sweep_run(root, run.name).root
        if done(workdir, run):
            log(f"# {run.name}: trained (marker in {workdir}), skipped")
            continue
        name = job_name(sweep_name, run.name)
        wd = os.fspath(workdir)
        program, train_args = job_program(run, marker), run_train_args(run, wd)
        if engine == "xpk":
            cmds = [cloud.xpk_command(sl, train_args, workload=name, cluster=ns.cluster, image=ns.image,
                                      num_slices=ns.num_slices, project=ns.project, zone=ns.zone,
                                      max_restarts=ns.max_restarts, program=program)]
        else:
            vm = cloud.TpuVm(name=name, zone=ns.zone, project=ns.project, spot=ns.spot)
            job = cloud.train_argv(train_args, multi_host=sl.hosts > 1, program=program)
            cmds = [argv for _, argv in tpu_vm_job_steps(sl, vm, job, wd)]
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


def tpu_vm_job_steps(sl: cloud.Slice, vm: cloud.TpuVm, job: list[str], workdir: str):
    """The TPU VM flow for one sweep run: create if absent, copy, install, start in the
    background on every worker unless that workdir's trainer already runs there."""
    steps = cloud.tpu_vm_steps(sl, vm, [], create=True)
    describe = cloud._gcloud("describe", vm.name, vm=vm)
    what, create = steps[0]
    steps[0] = (what, ["bash", "-c", f"{shlex.join(describe)} >/dev/null 2>&1 || {shlex.join(create)}"])
    ssh_all = cloud._gcloud("ssh", vm.name, vm=vm) + ["--worker=all"]
    start = (f"cd {vm.code_dir} && if pgrep -f -- {shlex.quote('--workdir ' + workdir)} >/dev/null; "
             f"then echo already running; else nohup {shlex.join(job)} > job.log 2>&1 & fi")
    steps[-1] = ("start the job on every worker", ssh_all + [f"--command={start}"])
    return steps


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
