"""Real multi-process training on one CPU machine: 2 JAX processes × 4 CPU devices joined by
``jax.distributed`` (gloo collectives), checked against the single-process 8-device run.

Nothing is mocked: the processes are ``train.py`` as a user starts them (directly with
``--coordinator/--num-processes/--process-id``, or through ``python -m sparsejax.launch local``).
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sparsejax import data, writers
from sparsejax import configure
from sparsejax.launch import local

pytestmark = pytest.mark.slow  # several real processes joined by jax.distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
MICRO = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.head_dim=32",
         "model.d_ff=160", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=5",
         "train.eval_batches=1", "train.eval_every=1000"]
STEPS = 16
RUN = MICRO + [f"train.steps={STEPS}", "train.log_every=1", "train.checkpoint_every=4",
               "mesh.data=2", "mesh.fsdp=4"]
# Same global batch, same mesh shape, but the all-reduces run over gloo between processes
# instead of inside one: float32 sums in another order. Measured on 2026-11-27 (2-core CPU): max
# relative loss difference ~1e-6 up to step 16, growing to 1.7e-5 by step 24 (rounding drift
# through the optimizer). Allowed: 1e-4 relative.
RTOL = 1e-4


def _args(workdir, *extra_sets):
    args = ["--config", str(REPO / "configs/tiny_relu.py"), "--workdir", str(workdir), "--no-progress"]
    for o in RUN + list(extra_sets):
        args += ["--set", o]
    return args


def _env(devices):
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _losses(workdir):
    recs = writers.read_jsonl(workdir / "metrics.jsonl")
    return ({r["step"]: r["loss"] for r in recs if "loss" in r},
            [r["eval_loss"] for r in recs if "eval_loss" in r])


def _steps_with_loss(workdir):
    return [r["step"] for r in writers.read_jsonl(workdir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, 8 CPU devices, the same mesh (data 2 × fsdp 4)."""
    workdir = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *_args(workdir)], cwd=REPO,
                          env=_env(8), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_two_processes_match_one_and_survive_a_kill(single, tmp_path):
    workdir = tmp_path / "run"
    port = local.free_port()
    # Phase 1: two train.py processes started by hand (as on TPU VM workers, no launcher).
    # When process 1 is SIGKILLed, process 0 must not hang: JAX's heartbeat (5 s here) aborts it.
    cmds = local.process_commands(_args(workdir, "train.steps=100000"), 2, port, heartbeat_timeout=5)
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in cmds]
    try:
        deadline = time.monotonic() + 120
        while not (workdir / "checkpoints" / "8").is_dir():
            assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
            assert time.monotonic() < deadline, "no checkpoint of step 8 within 120 s"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        procs[0].wait(timeout=60)
        survivor_s = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode != 0  # aborted by the coordination service, not finished
    assert survivor_s < 45, f"process 0 took {survivor_s:.0f}s to stop after its peer died"
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert 8 in saved

    # Phase 2: the launcher resumes both processes from the newest checkpoint, to STEPS.
    proc = subprocess.run([sys.executable, "-m", "sparsejax.launch", "local", "--processes", "2",
                           "--devices-per-process", "4", "--", *_args(workdir)], cwd=REPO,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    resumed = re.findall(r"^(\[1\] )?resumed from .* at step (\d+)$", proc.stdout, re.M)
    assert len(resumed) == 2 and resumed[0][1] == resumed[1][1], proc.stdout  # both processes
    assert int(resumed[0][1]) >= 8

    # Losses of steps 1..STEPS (before and after the kill) equal the single-process run.
    ref, ref_eval = _losses(single)
    got, got_eval = _losses(workdir)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=RTOL)
    np.testing.assert_allclose(got_eval, ref_eval, rtol=RTOL)
    assert len(ref_eval) == 1

    # One writer: one loss line per step, one TensorBoard event file per launch that reached
    # the loop (phase 1 and 2), a plot, and process 1 wrote only its own debug log.
    assert _steps_with_loss(workdir) == list(range(1, STEPS + 1))
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2, events
    assert (workdir / "activation_ratio.png").stat().st_size > 0
    assert (workdir / "train_debug.1.log").exists()
    # The checkpoint directory holds each step once, finalized (no temporary directories left).
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert all(n.isdigit() for n in names), names
    assert STEPS in map(int, names)
    for n in names:
        assert (workdir / "checkpoints" / n / "state").is_dir()
        assert json.loads((workdir / "checkpoints" / n / "meta" / "metadata").read_text())["step"] == int(n)

    # Each host read its own rows of every global batch: the two row ranges from the debug
    # logs partition 0..batch_size-1.
    rows = []
    for log in ("train_debug.log", "train_debug.1.log"):
        found = re.findall(r"process (\d) of 2 loads rows (\d+):(\d+) of each global batch of 8",
                           (workdir / log).read_text())
        assert found, log
        rows += [range(int(a), int(b)) for _, a, b in found[-1:]]
    assert sorted(i for r in rows for i in r) == list(range(8))


def test_sigterm_to_the_launcher_stops_every_process_at_one_step(tmp_path):
    """SIGTERM reaches the launcher; it forwards it; the processes agree on a step (at a
    log_every boundary), save it once and exit 143, and so does the launcher."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sparsejax.launch", "local", "--processes", "2",
                             "--devices-per-process", "4", "--",
                             *_args(workdir, "train.steps=100000", "train.log_every=5",
                                    "train.checkpoint_every=1000")],
                            cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((workdir / "metrics.jsonl").exists() and len(_steps_with_loss(workdir)) >= 6):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    stopped = re.findall(r"^(\[1\] )?stopped by SIGTERM after saving a checkpoint at step (\d+)$", err, re.M)
    assert len(stopped) == 2 and stopped[0][1] == stopped[1][1], out + err
    step = int(stopped[0][1])
    assert step % 5 == 0  # the processes agree before steps 6, 11, ...: they stop after a multiple of 5
    assert _steps_with_loss(workdir) == list(range(1, step + 1))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [step]


def _gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by init counts as exited)."""
    status = pathlib.Path(f"/proc/{pid}/status")
    try:
        return "zombie" in status.read_text()
    except OSError:
        return True


@pytest.mark.slow
def test_a_sigkilled_launcher_takes_its_processes_with_it(tmp_path):
    """SIGKILL cannot be forwarded: the children must end by themselves (PR_SET_PDEATHSIG armed by
    train.py from SPARSEJAX_PARENT_PID), save on the way out and release the workdir."""
    workdir = tmp_path / "run"
    err_path = tmp_path / "launch.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sparsejax.launch", "local", "--processes", "2",
                                 "--devices-per-process", "4", "--",
                                 *_args(workdir, "train.steps=100000", "train.log_every=1",
                                        "train.checkpoint_every=1000")],
                                cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                stdout=subprocess.DEVNULL, stderr=err)
    pids = []
    try:
        deadline = time.monotonic() + 120
        while not ((workdir / "metrics.jsonl").exists() and len(_steps_with_loss(workdir)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()[-3000:]
            time.sleep(0.1)
        pids = [int(p) for p in re.search(r"pids ([\d ]+)$", err_path.read_text(), re.M).group(1).split()]
        assert len(pids) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [p for p in pids if not _gone(p)]
    finally:
        proc.kill()
        for p in pids:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)
    assert not alive, f"processes {alive} outlived their SIGKILLed launcher"
    # They stopped together at one step and saved it (SIGTERM from the kernel = a preemption).
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 3 and _steps_with_loss(workdir) == list(range(1, saved[-1] + 1))
    # The lock is free: a new launch resumes from the saved step.
    again = subprocess.run([sys.executable, "-m", "sparsejax.launch", "local", "--processes", "2",
                            "--devices-per-process", "4", "--",
                            *_args(workdir, f"train.steps={saved[-1] + 2}")],
                           cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                           text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step {saved[-1]}" in again.stdout


def test_host_batches_partition_the_global_batch():
    """Derived independently of the trainer: the hosts' train and validation rows, stacked,
    are the single-host batch (no duplicate, no missing row), for 1, 2 and 4 hosts."""
    cfg = configure.load(str(REPO / "configs/tiny_relu.py"), MICRO + ["train.eval_batches=2"])
    whole = data.Dataset(cfg, 0, 1)
    want_train = [next(whole.train) for _ in range(3)]
    for hosts in (2, 4):
        parts = [data.Dataset(cfg, i, hosts) for i in range(hosts)]
        for b in range(3):
            got = [next(p.train) for p in parts]
            for key in ("inputs", "targets"):
                np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want_train[b][key])
        for b, want in enumerate(whole.validation):
            got = np.concatenate([p.validation[b]["inputs"] for p in parts])
            np.testing.assert_array_equal(got, want["inputs"])
            assert len({r.tobytes() for r in got}) == len(got)  # rows differ across hosts


# ------------------------------------------------------------------- the launcher's supervision
def _fake(cmds):
    """Real processes standing in for train.py: the launcher's waiting and killing is the same."""
    return [subprocess.Popen(c) for c in cmds]


def test_launcher_gives_its_processes_a_stop_timeout_within_its_grace():
    cmds = local.process_commands(["--config", "c.py"], 2, 1234,
                                  stop_timeout=local.stop_timeout_for(30))
    assert all(c[c.index("--stop-timeout") + 1] == "22.5" for c in cmds)
    assert local.stop_timeout_for(120) == 90 and local.stop_timeout_for(0.5) == 1
    own = local.process_commands(["--stop-timeout", "5"], 2, 1234, stop_timeout=90)
    assert all(c.count("--stop-timeout") == 1 and c[c.index("--stop-timeout") + 1] == "5"
               for c in own)


def test_launcher_kills_the_rest_when_one_dies():
    procs = _fake([["sleep", "120"], ["sh", "-c", "sleep 0.5; kill -9 $$"], ["sleep", "120"]])
    t0 = time.monotonic()
    code = local._wait(procs, [], grace=60)
    assert time.monotonic() - t0 < 10
    assert code == 128 + signal.SIGKILL
    for p in procs:
        p.wait(timeout=5)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 3


def test_launcher_reports_the_failing_exit_code_and_waits_for_success():
    procs = _fake([["sleep", "0.2"], ["sh", "-c", "sleep 0.4; exit 3"], ["sleep", "120"]])
    assert local._wait(procs, [], grace=60) == 3
    for p in procs:
        p.wait(timeout=5)
    assert procs[2].returncode == -signal.SIGKILL
    procs = _fake([["sleep", "0.2"], ["sleep", "0.4"]])
    assert local._wait(procs, [], grace=60) == 0


def test_launcher_sigkills_after_the_grace_period():
    procs = _fake([["sh", "-c", "trap '' TERM; sleep 120"]])
    t0 = time.monotonic()
    assert local._wait(procs, [signal.SIGTERM], grace=0.5) == 128 + signal.SIGTERM
    procs[0].wait(timeout=5)
    assert time.monotonic() - t0 < 5 and procs[0].returncode == -signal.SIGKILL


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flags, needle", [
    (["--coordinator", "localhost:1234"], "--num-processes, --process-id must be given"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id=2; allowed values: 0 … 1"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "is not HOST:PORT"),
    (["--stop-timeout", "-1"], "--stop-timeout=-1 must be >= 0"),
])
def test_train_rejects_bad_process_flags(tmp_path, flags, needle):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *_args(workdir), *flags],
                          cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("argv, needle", [
    (["local", "--processes", "0", "--", "--config", "x"], "--processes=0; allowed values"),
    (["local", "--devices-per-process", "0", "--", "--config", "x"], "--devices-per-process=0"),
    (["local", "--", "--config", "x", "--process-id", "1"], "--process-id is set by the launcher"),
    (["local", "--heartbeat-timeout", "-5", "--", "--config", "x"], "--heartbeat-timeout=-5; allowed"),
    (["local", "--grace", "-1", "--", "--config", "x"], "--grace=-1.0; allowed values: seconds > 0"),
    (["local", "--grace", "nan", "--", "--config", "x"], "--grace=nan"),
    (["local", "--port", "70000", "--", "--config", "x"], "--port=70000; allowed values: 1 … 65535"),
])
def test_launcher_rejects_bad_input(argv, needle, capsys):
    from sparsejax.launch import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_launcher_type_errors_are_one_line(capsys):
    from sparsejax.launch import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["local", "--grace", "abc", "--", "--config", "x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: argument --grace: invalid float value: 'abc'"]


def test_train_rejects_a_heartbeat_timeout_below_one_second(tmp_path):
    """JAX aborts (SIGABRT, a C++ stack) on it; train.py refuses it in one line first."""
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *_args(workdir),
                           "--heartbeat-timeout", "-5"],
                          cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--heartbeat-timeout=-5" in lines[0], proc.stderr
    assert not workdir.exists()


def test_a_launch_on_a_workdir_in_use_returns_at_once_with_one_line(tmp_path):
    """A second `launch local` on a workdir a live trainer holds: process 0 refuses (workdir in use,
    the holder's PID), leaves at once instead of waiting in jax.distributed's shutdown for its peer,
    and the launcher stops process 1 and returns exit 2 within seconds, without a traceback."""
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                               *_args(workdir, "train.steps=100000", "train.checkpoint_every=1000",
                                      "mesh.data=1", "mesh.fsdp=1")],
                              cwd=REPO, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((workdir / "metrics.jsonl").exists() and _steps_with_loss(workdir)):
            assert holder.poll() is None and time.monotonic() < deadline, holder.communicate()
            time.sleep(0.1)
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "sparsejax.launch", "local", "--processes", "2",
                                 "--devices-per-process", "4", "--", *_args(workdir)],
                                cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                                text=True, timeout=120)
        elapsed = time.monotonic() - t0
        assert holder.poll() is None  # the holder trains on, untouched
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    assert re.search(rf"in use.*{holder.pid}", second.stderr), second.stderr[-3000:]
    assert "Traceback" not in second.stderr, second.stderr[-3000:]
    # Start-up (imports, jax.distributed) takes ~10 s here; a refusing process that waits in
    # jax.distributed's shutdown for its peer keeps the launcher 42-45 s, until process 0 gives up.
    assert elapsed < 30, (elapsed, second.stderr[-3000:])


def _text_run(tmp_path, *extra, source="text"):
    """Twenty documents whose two validation documents are uneven: one gives four validation
    batches, the other one. ``text``: .txt files (the validation documents are those
    data.source=text draws); ``tfds``: the same documents as a TFDS dataset built on disk."""
    docs = tmp_path / "docs"
    docs.mkdir()
    _, valid = data.split_documents(20, 0.1)
    texts = [("abcdefghij" * 50)[:300 if i == valid[0] else 40 if i == valid[1] else 400]
             for i in range(20)]
    if source == "text":
        for i, text in enumerate(texts):
            (docs / f"doc{i:02d}.txt").write_text(text)
        data_sets = [f"data.text_files={docs}", "data.validation_fraction=0.1"]
    else:
        from sparsejax import tfds_build

        tfds_build.build({"train": [t for i, t in enumerate(texts) if i not in valid],
                          "validation": [texts[i] for i in valid]}, docs, name="uneven_docs")
        data_sets = ["data.tfds_name=uneven_docs", f"data.tfds_data_dir={docs}",
                     "data.tfds_eval_split=validation"]
    sets = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.head_dim=16",
            "model.d_ff=64", "train.batch_size=4", "train.seq_len=16", "train.warmup_steps=2",
            "train.log_every=1", f"data.source={source}", *data_sets, *extra]
    args = ["--config", str(REPO / "configs/tiny_relu.py"), "--workdir", str(tmp_path / "run"),
            "--no-progress"]
    for o in sets:
        args += ["--set", o]
    return args


@pytest.mark.parametrize("source", ["text", "tfds"])
def test_uneven_validation_shards_evaluate_on_both_processes_without_deadlock(tmp_path, source):
    args = _text_run(tmp_path, "train.steps=2", "train.eval_every=2", "train.eval_batches=4",
                     "train.checkpoint_every=2", source=source)
    proc = subprocess.run([sys.executable, "-m", "sparsejax.launch", "local", "--processes", "2",
                           "--devices-per-process", "1", "--", *args], cwd=REPO,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    assert [r["step"] for r in writers.read_jsonl(run / "metrics.jsonl") if "eval_loss" in r] == [2]
    counts = [re.findall(r"validation: (\d+) batches on every process \(this process's share of "
                         r"the records gave (\d+)\)", (run / log).read_text())[-1]
              for log in ("train_debug.log", "train_debug.1.log")]
    # Each process read one validation document (4 and 1 batches); both evaluated 1.
    assert sorted(counts) == [("1", "1"), ("1", "4")], counts


def test_a_stop_signal_while_blocked_in_a_collective_exits_within_the_timeout(tmp_path):
    """Process 1 is stopped (SIGSTOP), so process 0 blocks in the next collective and never
    returns to Python; SIGTERM to it must still end it, with one line saying why, well before a
    launcher's grace (and JAX's 100 s heartbeat) would."""
    args = _text_run(tmp_path, "train.steps=100000", "train.eval_every=100000",
                     "train.checkpoint_every=100000") + ["--stop-timeout", "3"]
    cmds = local.process_commands(args, 2, local.free_port())
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    run = tmp_path / "run"
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and len(_steps_with_loss(run)) >= 3):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGSTOP)
        time.sleep(1.0)
        procs[0].send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = procs[0].communicate(timeout=40)
        took = time.monotonic() - sent
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 143, err[-2000:]
    assert took < 30, f"{took:.0f} s"
    lines = err.strip().splitlines()
    assert lines[-1].startswith("stopped by SIGTERM: the run did not reach a step boundary within "
                                "3 s of the signal"), err[-2000:]
