"""Fault injection with real processes, signals and files: each way a run could be lost or
silently corrupted, and each user mistake, reproduced and checked.

Every test runs ``train.py`` / ``eval.py`` / ``python -m sparsejax.sweep`` as a user would and
checks the exit code, the one-line message, that no checkpoint holds non-finite values, that
``metrics.jsonl`` has exactly one loss line per step, and that resumed runs match.
"""

import json
import os
import pathlib
import resource
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparsejax import writers
from run_wait import wait_for, wait_for_step

pytestmark = pytest.mark.slow  # real training processes killed and restarted

REPO = pathlib.Path(__file__).resolve().parents[1]
MICRO = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.head_dim=32",
         "model.d_ff=160", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=5",
         "train.eval_batches=1", "train.eval_every=1000"]


def _env(devices: int = 1):
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _train_cmd(workdir, *overrides, config="configs/tiny_relu.py", extra=()):
    args = [sys.executable, str(REPO / "train.py"), "--config", str(config if os.path.isabs(config)
            else REPO / config), "--workdir", str(workdir), "--no-progress", *extra]
    for o in MICRO + list(overrides):
        args += ["--set", o]
    return args


def _train(workdir, *overrides, extra=(), config="configs/tiny_relu.py", devices=1, timeout=240,
           preexec=None):
    return subprocess.run(_train_cmd(workdir, *overrides, config=config, extra=extra),
                          env=_env(devices), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, preexec_fn=preexec)


def _start(workdir, *overrides):
    return subprocess.Popen(_train_cmd(workdir, *overrides), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def _eval(*args, timeout=240):
    return subprocess.run([sys.executable, str(REPO / "eval.py"), "--no-progress", *map(str, args)],
                          env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _one_line_error(proc, code, *needles):
    """Exit ``code`` with exactly one line on stderr that contains every needle."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _loss_steps(workdir):
    return [r["step"] for r in writers.read_jsonl(workdir / "metrics.jsonl") if "loss" in r]


def _losses(workdir):
    return [r["loss"] for r in writers.read_jsonl(workdir / "metrics.jsonl") if "loss" in r]


def _steps(workdir):
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _params_finite(step_dir) -> bool:
    """Every array of a saved step, read back by orbax independently of sparsejax."""
    tree = ocp.PyTreeCheckpointer().restore(pathlib.Path(step_dir) / "state")
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(tree)]
    return all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating))


# ---------------------------------------------------------------- 1. NaN is never checkpointed
def test_divergence_never_leaves_a_non_finite_checkpoint(tmp_path):
    # A learning rate that blows the parameters up, with a checkpoint every step.
    diverge = ["train.learning_rate=1e30", "train.warmup_steps=0", "train.schedule=constant",
               "train.checkpoint_every=1", "train.steps=8"]
    proc = _train(tmp_path, *diverge)
    line = _one_line_error(proc, 1, "diverged", "Last good checkpoint")
    saved = _steps(tmp_path)
    assert saved, "the steps before the divergence were finite and should be saved"
    assert all(_params_finite(tmp_path / "checkpoints" / str(s)) for s in saved)
    assert f"step {saved[-1]} in" in line
    # A restart resumes from the good step and stops again, still writing nothing bad.
    again = _train(tmp_path, *diverge)
    _one_line_error(again, 1, "diverged")
    assert all(_params_finite(tmp_path / "checkpoints" / str(s)) for s in _steps(tmp_path))


def test_nan_gradients_with_finite_loss_stop_before_the_checkpoint(tmp_path):
    # The fault hook poisons only the gradients of step 7: its loss is finite, its params are not.
    proc = _train(tmp_path, "train.steps=20", "train.checkpoint_every=1", "train.log_every=5",
                  "train.fault_nan_at_step=7")
    _one_line_error(proc, 1, "step 7 diverged", "Last good checkpoint: step 6")
    assert _steps(tmp_path)[-1] == 6
    assert _loss_steps(tmp_path) == list(range(1, 7))


# ------------------------------------------------------------ 2. evaluation is read-only
def test_eval_changes_nothing_in_the_run_and_a_live_trainer_survives_it(tmp_path):
    run = tmp_path / "run"
    _ok(_train(run, "train.steps=10", "train.checkpoint_every=5"))
    # A trainer's in-flight temporary directory: evaluation must leave it alone.
    inflight = run / "checkpoints" / "15.orbax-checkpoint-tmp-1234"
    inflight.mkdir()
    (inflight / "partial").write_text("x")
    before = sorted(str(p.relative_to(run)) for p in (run / "checkpoints").rglob("*"))
    _ok(_eval("--workdir", run, "--checkpoints", "last", "--metrics", "zero",
              "--out", tmp_path / "res.json"))
    after = sorted(str(p.relative_to(run)) for p in (run / "checkpoints").rglob("*"))
    assert before == after
    assert json.loads((tmp_path / "res.json").read_text())["checkpoints"][0]["step"] == 10

    # And for real: evaluate while a trainer is writing a checkpoint every 5 steps.
    live = tmp_path / "live"
    trainer = _start(live, "train.steps=400", "train.checkpoint_every=5", "train.log_every=1",
                     "train.keep_last=100")
    try:
        wait_for(lambda: len(_steps(live)) >= 2, trainer, what="two checkpoints")
        for _ in range(2):
            _ok(_eval("--workdir", live, "--checkpoints", "last", "--metrics", "zero",
                      "--out", tmp_path / "live.json"))
        out, err = trainer.communicate(timeout=300)
    finally:
        trainer.kill()
    assert trainer.returncode == 0, err
    assert _steps(live) == list(range(5, 401, 5))
    assert _loss_steps(live) == list(range(1, 401))


# ------------------------------------------------------- 3. one writer per run directory
def test_a_second_trainer_on_a_busy_workdir_is_refused(tmp_path):
    # The first trainer has far more steps than it can run while the second starts (on a busy
    # machine a short run can finish first, and the second then finds the run complete).
    first = _start(tmp_path, "train.steps=100000", "train.log_every=1", "train.checkpoint_every=100")
    try:
        wait_for_step(tmp_path, 1, first)
        second = _train(tmp_path, "train.steps=100000", "train.log_every=1", "train.checkpoint_every=100")
        _one_line_error(second, 2, f"in use by PID {first.pid}", "--workdir")
        assert first.poll() is None  # untouched by the refused second trainer
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 143, err
    steps = _loss_steps(tmp_path)
    assert steps == list(range(1, steps[-1] + 1))  # one writer: no step twice, none missing


SWEEP = """
from sparsejax import sweep

def get_sweep():
    runs = (sweep.Run(name="relu", config="configs/tiny_relu.py", overrides={overrides!r},
                      activation="relu"),)
    return sweep.Sweep(name="kill", runs=runs, eval=sweep.EvalOptions(metrics=("zero",)))
"""


def test_killing_a_sweep_stops_its_trainer_and_a_restart_finishes_the_run(tmp_path):
    from sparsejax import sweep

    overrides = tuple(MICRO) + ("train.steps=300", "train.log_every=1", "train.checkpoint_every=20")
    spec = tmp_path / "kill_sweep.py"
    spec.write_text(textwrap.dedent(SWEEP.format(overrides=overrides)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sparsejax.sweep", str(spec), "--out", str(out), "--skip-eval",
           "--n-boot", "0"]
    workdir = out / "runs" / "relu"
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(workdir, 25, proc, timeout=180)
        trainer_pid = json.loads((workdir / ".lock").read_text())["pid"]
        proc.send_signal(signal.SIGKILL)  # the sweep dies at once; its trainer must not live on
        proc.wait()
    finally:
        proc.kill()
    deadline = time.time() + 60
    while time.time() < deadline and os.path.exists(f"/proc/{trainer_pid}"):
        status = pathlib.Path(f"/proc/{trainer_pid}/status")
        if status.exists() and "zombie" in status.read_text():
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{trainer_pid}") or "zombie" in pathlib.Path(
        f"/proc/{trainer_pid}/status").read_text(), "the trainer outlived its sweep"
    assert not sweep.train_done(workdir, sweep.resolve(sweep.load_sweep(spec))[0])
    # The trainer checkpointed on its way out (SIGTERM from the dying parent), and said so in
    # its log although the sweep that started it was gone.
    assert _steps(workdir) and _steps(workdir)[-1] >= 25
    assert f"stopped by SIGTERM after saving a checkpoint at step {_steps(workdir)[-1]}" in (
        workdir / "train.log").read_text()
    (workdir / sweep.MARKER).write_text('{"run": "relu", "conf')  # a marker torn by a crash
    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _loss_steps(workdir) == list(range(1, 301))
    assert json.loads((workdir / sweep.MARKER).read_text())["run"] == "relu"


@pytest.mark.slow
def test_a_terminated_sweep_logs_its_trainers_stop_line(tmp_path):
    overrides = tuple(MICRO) + ("train.steps=300", "train.log_every=1", "train.checkpoint_every=100")
    spec = tmp_path / "term_sweep.py"
    spec.write_text(textwrap.dedent(SWEEP.format(overrides=overrides)))
    out = tmp_path / "out"
    workdir = out / "runs" / "relu"
    proc = subprocess.Popen([sys.executable, "-m", "sparsejax.sweep", str(spec), "--out", str(out),
                             "--skip-eval", "--n-boot", "0"], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(workdir, 10, proc, timeout=180)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143
    saved = _steps(workdir)
    assert saved and saved[-1] >= 10
    line = f"stopped by SIGTERM after saving a checkpoint at step {saved[-1]}"
    assert line in (workdir / "train.log").read_text()
    assert line in stdout  # echoed to the console as well (read back from the log)


SWEEP_TWO = """
from sparsejax import sweep

def get_sweep():
    runs = tuple(sweep.Run(name=a, config="configs/tiny_relu.py", activation=a,
                           overrides={overrides!r} + (f"model.activation={{a}}",))
                 for a in ("relu", "silu"))
    return sweep.Sweep(name="term2", runs=runs, eval=sweep.EvalOptions(metrics=("zero",)))
"""


@pytest.mark.slow
def test_a_terminated_parallel_sweep_stops_every_trainer_and_a_restart_finishes_both(tmp_path):
    overrides = tuple(MICRO) + ("train.steps=200", "train.log_every=1", "train.checkpoint_every=50")
    spec = tmp_path / "term2_sweep.py"
    spec.write_text(textwrap.dedent(SWEEP_TWO.format(overrides=overrides)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sparsejax.sweep", str(spec), "--out", str(out), "--skip-eval",
           "--n-boot", "0", "--jobs", "2"]
    workdirs = [out / "runs" / name for name in ("relu", "silu")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for workdir in workdirs:
            wait_for_step(workdir, 5, proc, timeout=240)
        pids = [json.loads((w / ".lock").read_text())["pid"] for w in workdirs]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 143
    for workdir, pid in zip(workdirs, pids):
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in pathlib.Path(
            f"/proc/{pid}/status").read_text(), f"{workdir.name}'s trainer outlived its sweep"
        saved = _steps(workdir)
        assert saved and f"stopped by SIGTERM after saving a checkpoint at step {saved[-1]}" in (
            workdir / "train.log").read_text()
    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    for workdir in workdirs:
        assert _loss_steps(workdir) == list(range(1, 201))  # resumed: every step once


# ---------------------------------------------------------------- 4. --no-resume never mixes
def test_no_resume_moves_the_old_run_aside(tmp_path):
    _ok(_train(tmp_path, "train.steps=10", "train.checkpoint_every=10", "train.seed=0"))
    old_losses = _losses(tmp_path)
    proc = _ok(_train(tmp_path, "train.steps=10", "train.checkpoint_every=10", "train.seed=1",
                      extra=("--no-resume",)))
    assert "moved the previous run's files to" in proc.stdout
    previous = list((tmp_path / "previous").iterdir())
    assert len(previous) == 1 and _steps(previous[0]) == [10]
    assert json.loads((previous[0] / "config.json").read_text())["train"]["seed"] == 0
    assert _loss_steps(tmp_path) == list(range(1, 11))
    assert _losses(tmp_path) != old_losses
    meta = json.loads((tmp_path / "checkpoints" / "10" / "meta" / "metadata").read_text())
    assert meta["seed"] == 1 and meta["config"]["train"]["seed"] == 1
    # Resuming now continues the seed-1 run, not the old one.
    resumed = _ok(_train(tmp_path, "train.steps=12", "train.checkpoint_every=10", "train.seed=1"))
    assert "at step 10" in resumed.stdout


# ------------------------------------------------------ 5. bad steps are moved aside, rewritten
def test_corrupt_and_empty_steps_are_moved_aside_and_rewritten(tmp_path):
    common = ["train.checkpoint_every=20", "train.keep_last=5"]
    _ok(_train(tmp_path, "train.steps=40", *common))
    for f in (tmp_path / "checkpoints" / "40" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\x00garbage")
    (tmp_path / "checkpoints" / "999").mkdir()  # an empty step dir must not disable saving
    proc = _ok(_train(tmp_path, "train.steps=60", *common))
    assert "checkpoint step 999 rejected" in proc.stdout
    assert "checkpoint step 40 rejected" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 20" in proc.stdout
    assert _steps(tmp_path) == [20, 40, 60]  # step 40 written again
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "rejected").iterdir()) == ["40", "999"]
    assert _loss_steps(tmp_path) == list(range(1, 61))
    # eval reads every step: the corrupt one was moved aside and rewritten.
    _ok(_eval("--workdir", tmp_path, "--checkpoints", "all", "--metrics", "zero"))


# ------------------------------------------------------------------------------ 6. signals
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_on_a_checkpoint_step_saves_once_and_exits_cleanly(tmp_path, sig, code):
    # Every step is a checkpoint step, so the signal always lands on one that was just saved.
    common = ["train.steps=400", "train.log_every=1", "train.checkpoint_every=1", "train.keep_last=2"]
    proc = _start(tmp_path, *common)
    wait_for_step(tmp_path, 5, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"stopped by {sig.name} after saving a checkpoint at step" in lines[0], err
    stopped_at = int(lines[0].rsplit(" ", 1)[1])
    assert _steps(tmp_path)[-1] == stopped_at and _loss_steps(tmp_path)[-1] == stopped_at
    resumed = _ok(_train(tmp_path, "train.steps=20", "train.log_every=1", "train.checkpoint_every=10")
                  ) if stopped_at < 20 else None
    if resumed is not None:
        assert _loss_steps(tmp_path) == list(range(1, 21))


# ------------------------------------------------------- 7. config identity in the checkpoints
def test_deleting_config_json_does_not_let_another_config_resume(tmp_path):
    _ok(_train(tmp_path, "train.steps=10", "train.checkpoint_every=10"))
    (tmp_path / "config.json").unlink()
    proc = _train(tmp_path, "train.steps=20", "model.activation=silu")
    _one_line_error(proc, 2, "model.activation", "--force")
    (tmp_path / "config.json").write_text("{garbage")
    ok = _ok(_train(tmp_path, "train.steps=12", "train.checkpoint_every=10"))
    assert "at step 10" in ok.stdout
    assert json.loads((tmp_path / "config.json").read_text())["model"]["activation"] == "relu"


# --------------------------------------------------------------------- 8. memory, before init
def test_a_state_too_big_for_the_host_fails_fast_with_both_numbers(tmp_path):
    # The 2.4B paper config needs ~33 GB of parameters and Adam moments on one device.
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config",
                           str(REPO / "configs/sparsing_law_2.4b.py"), "--workdir", str(tmp_path / "w"),
                           "--no-progress", "--set", "train.batch_size=1", "--set", "train.seq_len=128"],
                          env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    line = _one_line_error(proc, 2, "GiB per device", "allows", "mesh.fsdp")
    assert time.time() - t0 < 120, "must fail before compiling or allocating"
    need, allow = [float(x) for x in __import__("re").findall(r"([\d.]+) GiB", line)[:2]]
    assert need > allow and need > 25
    assert not (tmp_path / "w").exists()


def test_a_compiled_step_too_big_for_the_memory_limit_fails_before_allocating(tmp_path):
    # Cap the address space: the tiny state fits, the compiled step of a huge batch does not.
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    proc = _train(tmp_path / "w", "train.batch_size=128", "train.seq_len=256", "model.d_ff=65536",
                  preexec=cap)
    _one_line_error(proc, 2, "compiled train step needs", "train.batch_size")
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------ 9. user mistakes: one line, exit 2
def _bad_config(tmp_path, body):
    path = tmp_path / "bad_config.py"
    path.write_text(body)
    return path


@pytest.mark.parametrize("case", ["syntax", "raises", "indivisible", "too_few_devices",
                                  "eval_batches", "workdir_is_file", "workdir_readonly", "tfds"])
def test_user_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path, case):
    workdir, overrides, config, devices = tmp_path / "w", [], "configs/tiny_relu.py", 1
    needles = []
    if case == "syntax":
        config = _bad_config(tmp_path, "def get_config(:\n    pass\n")
        needles = ["bad_config.py", "line 1", "SyntaxError"]
    elif case == "raises":
        config = _bad_config(tmp_path, "def get_config():\n    return {}['model']\n")
        needles = ["get_config() raised KeyError", "line 2"]
    elif case == "indivisible":
        overrides, devices = ["model.d_ff=321", "mesh.tensor=2"], 2
        needles = ["model.d_ff=321", "mesh.tensor=2"]
    elif case == "too_few_devices":
        overrides, needles = ["mesh.data=4"], ["needs 4 devices", "1 are available"]
    elif case == "eval_batches":
        overrides, needles = ["train.batch_size=4096", "train.steps=1"], ["validation split"]
    elif case == "workdir_is_file":
        workdir = tmp_path / "file"
        workdir.write_text("not a directory")
        needles = ["is not a directory"]
    elif case == "workdir_readonly":
        workdir, needles = pathlib.Path("/sys/kernel/sparsejax_test_run"), ["is not writable"]
    elif case == "tfds":
        overrides = ["data.source=tfds", f"data.tfds_data_dir={tmp_path / 'tfds'}"]
        needles = ["data.tfds_name='lm1b'", "tfds build lm1b"]
    before = sorted(tmp_path.rglob("*"))
    proc = _train(workdir, *overrides, config=config, devices=devices)
    _one_line_error(proc, 2, *needles)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    assert "Traceback" not in proc.stdout


@pytest.mark.parametrize("case", ["out_is_dir", "out_readonly", "garbage_config", "no_run"])
def test_eval_mistakes_are_one_line_exit_2(tmp_path, case):
    run = tmp_path / "run"
    run.mkdir()
    args = ["--workdir", run]
    if case == "out_is_dir":
        args += ["--out", tmp_path]
        needles = ["is a directory"]
    elif case == "out_readonly":
        args += ["--out", "/sys/kernel/sparsejax_eval/results.json"]
        needles = ["is not writable"]
    elif case == "garbage_config":
        (run / "config.json").write_text("[1, 2")
        (run / "checkpoints").mkdir()
        needles = ["config.json is not valid JSON"]
    else:
        args = ["--workdir", tmp_path / "missing"]
        needles = ["does not exist"]
    before = sorted(tmp_path.rglob("*"))
    t0 = time.time()
    proc = _eval(*args)
    _one_line_error(proc, 2, *needles)
    assert time.time() - t0 < 60, "checked before any compute"
    assert sorted(tmp_path.rglob("*")) == before


def test_torn_lines_in_metrics_are_dropped_with_a_warning_on_resume(tmp_path):
    _ok(_train(tmp_path, "train.steps=10", "train.checkpoint_every=10", "train.log_every=1"))
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:20]  # a line torn in the middle of the file
    path.write_text("\n".join(lines) + "\n")
    proc = _ok(_train(tmp_path, "train.steps=15", "train.checkpoint_every=10", "train.log_every=1"))
    assert "dropped 1 unreadable line(s) (line 5)" in proc.stdout
    assert (tmp_path / "metrics.jsonl.damaged").exists()
    steps = _loss_steps(tmp_path)
    assert steps == [1, 2, 3, 4] + list(range(6, 16))  # the torn step is gone, not duplicated


def test_a_finished_run_says_so_instead_of_a_nan_loss(tmp_path):
    _ok(_train(tmp_path, "train.steps=10", "train.checkpoint_every=10"))
    proc = _ok(_train(tmp_path, "train.steps=10", "train.checkpoint_every=10"))
    assert "nothing to do" in proc.stdout and "already trained to step 10" in proc.stdout
    assert "loss nan" not in proc.stdout


def test_a_full_disk_is_one_line_and_leaves_no_finished_looking_checkpoint(tmp_path):
    # RLIMIT_FSIZE makes the first large write fail with EFBIG, as a full disk fails with ENOSPC.
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    proc = _train(tmp_path, "train.steps=30", "train.checkpoint_every=10", "model.d_ff=512",
                  "model.d_model=128", preexec=limit)
    line = _one_line_error(proc, 1)
    assert "checkpoint" in line or "writing" in line, line
    assert len(proc.stdout.splitlines()) < 10
    for s in _steps(tmp_path):  # whatever orbax finalized must restore
        assert _params_finite(tmp_path / "checkpoints" / str(s))


# --------------------------------------- 7. live runs, damaged sources, signals while starting
def _damage(step_dir):
    """Truncate the array data of a saved step to nothing (a disk that lost the tail of a copy)."""
    files = [f for f in pathlib.Path(step_dir, "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(b"")


def test_eval_skips_a_step_the_trainer_deleted_and_names_it(tmp_path, monkeypatch, capsys):
    """A live trainer's keep_last cleanup deletes a step between eval listing the steps and
    reading it (the real deletion, at a fixed moment): ``all`` skips it with a note naming it;
    an explicit step list fails with one message naming it, not blaming the config."""
    import shutil

    from sparsejax import evaluation, trained_run
    from sparsejax.eval_options import EvalOptions

    run = tmp_path / "run"
    _ok(_train(run, "train.steps=15", "train.checkpoint_every=5"))
    real_load = trained_run.load

    def load_then_delete(workdir):
        loaded = real_load(workdir)
        shutil.rmtree(run / "checkpoints" / "10")  # what orbax's max_to_keep cleanup does
        return loaded

    monkeypatch.setattr(trained_run, "load", load_then_delete)
    res = evaluation.evaluate_run(run, EvalOptions(metrics=("zero",)), checkpoints="all", progress=False)
    assert [e["step"] for e in res["checkpoints"]] == [5, 15]
    assert res["vanished_steps"] == [10]
    assert "note: checkpoint step 10" in capsys.readouterr().err

    # A fresh run with step 10 again; asked for by number, its deletion is an error naming it.
    _ok(_train(run, "train.steps=15", "train.checkpoint_every=5", extra=["--no-resume"]))
    with pytest.raises(trained_run.StepVanished, match="step 10 .* was deleted while it was being read"):
        evaluation.evaluate_run(run, EvalOptions(metrics=("zero",)), checkpoints="10,15", progress=False)


@pytest.mark.slow
def test_eval_of_a_live_run_that_keeps_two_steps_finishes(tmp_path):
    """eval --checkpoints all|last while the trainer (keep_last=2)
    deletes old steps. Each eval finishes; every step it skipped is named in a note."""
    live = tmp_path / "live"
    trainer = _start(live, "train.steps=100000", "train.checkpoint_every=5", "train.log_every=1",
                     "train.keep_last=2")
    try:
        wait_for(lambda: len(_steps(live)) >= 2, trainer, what="two checkpoints")
        for spec in ("all", "last", "all"):
            out = tmp_path / f"{spec}.json"
            proc = _ok(_eval("--workdir", live, "--checkpoints", spec, "--metrics", "zero", "--out", out))
            res = json.loads(out.read_text())
            notes = [int(n) for n in __import__("re").findall(r"note: checkpoint step (\d+) ", proc.stderr)]
            assert res.get("vanished_steps", []) == sorted(set(notes)), proc.stderr
            evaluated = [e["step"] for e in res["checkpoints"]]
            assert evaluated and all(s % 5 == 0 for s in evaluated) and not set(evaluated) & set(notes)
            assert "cannot be restored" not in proc.stderr
    finally:
        trainer.kill()
        trainer.communicate()


@pytest.mark.slow
def test_a_damaged_step_is_one_line_for_eval_and_warm_start_and_nothing_is_written(tmp_path):
    """Truncated array files: eval says which step and that its files are damaged, in one line
    (no orbax background tracebacks); a warm start from it is refused before the new workdir
    exists. Checkpoints of two processes (2 × 4 devices) make orbax's background readers fail
    the loudest."""
    source = tmp_path / "src"
    proc = subprocess.run([sys.executable, "-m", "sparsejax.launch", "local", "--processes", "2",
                           "--devices-per-process", "4", "--", "--config", str(REPO / "configs/tiny_relu.py"),
                           "--workdir", str(source), "--no-progress",
                           *[a for o in MICRO + ["train.steps=4", "train.checkpoint_every=2",
                                                 "mesh.data=2", "mesh.fsdp=4"] for a in ("--set", o)]],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    _ok(proc)
    _damage(source / "checkpoints" / "4")
    for spec in ("last", "last", "all"):
        before = sorted(tmp_path.rglob("*"))
        proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--no-progress", "--workdir",
                               str(source), "--checkpoints", spec, "--metrics", "zero",
                               "--out", str(tmp_path / "e" / "r.json")],
                              env=_env(8), capture_output=True, text=True, timeout=240, cwd=REPO)
        _one_line_error(proc, 2, "checkpoint step 4", "damaged")
        assert sorted(tmp_path.rglob("*")) == before

    target = tmp_path / "warm"
    proc = _train(target, "train.steps=2", f"train.warm_start={source}")
    _one_line_error(proc, 2, "train.warm_start=", "(step 4)", "damaged")
    assert not target.exists()
    # The advice in the message works: with the damaged step moved aside, step 2 is used.
    (source / "checkpoints" / "4").rename(tmp_path / "step4.damaged")
    proc = _ok(_train(target, "train.steps=2", f"train.warm_start={source}"))
    assert "warm start: parameters of" in proc.stdout and "step 2" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 1.5])
def test_sigterm_while_starting_is_one_line(tmp_path, delay):
    """Before the trainer takes over the signals (importing jax, loading the config): one line,
    exit 143, nothing written (it was killed silently before)."""
    workdir = tmp_path / "w"
    proc = _start(workdir, "train.steps=50")
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM before"), err
    if "before training started" in lines[0]:
        assert not workdir.exists()


@pytest.mark.slow
def test_a_cpu_run_does_not_initialise_libtpu(tmp_path):
    """libtpu is installed (TPU compile tests); with no TPU here and JAX_PLATFORMS unset, a
    fresh run, a resumed one and eval print no libtpu errors (TPU_WORKER_HOSTNAMES ...)."""
    from libtpu_guard import require_libtpu

    require_libtpu("check that CPU runs do not initialise it")
    env = _env()
    env.pop("JAX_PLATFORMS")
    run = tmp_path / "run"
    for steps in (2, 4):
        proc = subprocess.run(_train_cmd(run, f"train.steps={steps}", "train.checkpoint_every=2"),
                              env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
        _ok(proc)
        assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--no-progress", "--workdir", str(run),
                           "--checkpoints", "last", "--metrics", "zero"],
                          env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    _ok(proc)
    assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr


def test_eval_of_a_run_whose_mesh_needs_more_devices_is_one_line(tmp_path):
    run = tmp_path / "run"
    _ok(_train(run, "train.steps=2", "mesh.data=2", devices=2))
    before = sorted(tmp_path.rglob("*"))
    _one_line_error(_eval("--workdir", run, "--metrics", "zero"), 2, "needs 2 devices", "1 are available")
    assert sorted(tmp_path.rglob("*")) == before
