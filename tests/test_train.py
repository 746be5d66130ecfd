"""End-to-end training runs in subprocesses: learning, resume, SIGKILL/SIGTERM, config checks.

The fault-injection suite (divergence, corruption, locking, signals, user mistakes) is
tests/test_faults.py."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from sparsejax import checkpointing, writers
from run_wait import wait_for_step

pytestmark = pytest.mark.slow  # end-to-end training runs in subprocesses

REPO = pathlib.Path(__file__).resolve().parents[1]
MICRO = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.head_dim=32",
         "model.d_ff=160", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=5",
         "train.eval_batches=1"]


def _cmd(workdir, *overrides, config="configs/tiny_relu.py", extra=()):
    args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / config),
            "--workdir", str(workdir), "--no-progress", *extra]
    for o in MICRO + list(overrides):
        args += ["--set", o]
    return args


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop run
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(workdir, *overrides, extra=(), check=True, timeout=120):
    proc = subprocess.run(_cmd(workdir, *overrides, extra=extra), env=_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _losses(workdir):
    rows = [r for r in writers.read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def test_short_run_learns_and_writes_outputs(tmp_path):
    proc = _run(tmp_path, "train.steps=120", "train.log_every=10", "train.eval_every=60",
                "train.checkpoint_every=60", "train.learning_rate=3e-3")
    steps, losses = _losses(tmp_path)
    assert steps == list(range(1, 121))
    # From ln(256) = 5.55 at init to below 3.0 nats/byte in 120 steps of 256 tokens.
    assert losses[0] > 5.3 and np.mean(losses[-10:]) < 3.0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert len(last["activation_ratio_layers"]) == 2 and 0 < last["activation_ratio"] < 1
    assert {"grad_norm", "learning_rate", "tokens_seen", "tokens_per_s", "mfu", "perplexity"} <= set(last)
    assert last["tokens_seen"] == 120 * 8 * 32
    # Steps 60 and 120 end a logging window and also evaluate and checkpoint: their throughput must
    # come from a whole window, not from one step that had already finished (that read ~400x high).
    tps = np.array([r["tokens_per_s"] for r in rows if "loss" in r])
    assert np.all(np.isfinite(tps) & (tps > 0)) and tps.max() < 5 * np.median(tps), (tps.max(), np.median(tps))
    assert any("eval_loss" in r for r in rows)
    assert "final activation ratio (mean over layers):" in proc.stdout
    assert (tmp_path / "activation_ratio.png").stat().st_size > 10_000
    assert list((tmp_path / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [60, 120]


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    common = ["train.steps=240", "train.log_every=1", "train.checkpoint_every=40",
              "train.eval_every=1000"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _run(ref, *common)
    proc = subprocess.Popen(_cmd(killed, *common), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        reached = wait_for_step(killed, 100, proc, timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert reached < 240
    resumed = _run(killed, *common)
    assert "resumed from" in resumed.stdout
    steps_ref, loss_ref = _losses(ref)
    steps_res, loss_res = _losses(killed)
    assert steps_res == steps_ref == list(range(1, 241))
    assert loss_res == loss_ref  # bitwise: float32 values round-trip exactly through JSON


def test_sigterm_saves_a_checkpoint_then_resumes(tmp_path):
    common = ["train.steps=400", "train.log_every=1", "train.checkpoint_every=1000",
              "train.eval_every=1000"]
    proc = subprocess.Popen(_cmd(tmp_path, *common), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    wait_for_step(tmp_path, 30, proc, timeout=60)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 30 <= saved[0] < 400
    assert f"checkpoint at step {saved[0]}" in err
    resumed = _run(tmp_path, *common)
    assert f"resumed from {tmp_path / 'checkpoints'} at step {saved[0]}" in resumed.stdout
    steps, _ = _losses(tmp_path)
    assert steps == list(range(1, 401))


def test_different_config_refuses_to_resume_unless_forced(tmp_path):
    _run(tmp_path, "train.steps=10", "train.checkpoint_every=10")
    proc = _run(tmp_path, "train.steps=20", "model.activation=silu", check=False)
    assert proc.returncode == 2 and "model.activation" in proc.stderr and "--force" in proc.stderr
    # A longer run of the same config is a legitimate resume.
    ok = _run(tmp_path, "train.steps=20", "train.checkpoint_every=10")
    assert "resumed from" in ok.stdout
    forced = _run(tmp_path, "train.steps=30", "train.checkpoint_every=10",
                  "model.activation=relu2", extra=("--force",))
    assert "resumed from" in forced.stdout


def test_bad_config_exits_2_naming_the_field(tmp_path):
    proc = _run(tmp_path, "model.activation=sigmoidd", check=False)
    assert proc.returncode == 2 and "model.activation" in proc.stderr and "relu" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_metrics_file_with_torn_last_line_is_repaired(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in writers.read_jsonl(path)] == [1, 2]
    w = writers.MetricsWriter(tmp_path, tensorboard=False)
    w.truncate_after(1)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(json.JSONDecodeError):  # damage in the middle is not silently dropped
        writers.read_jsonl(path)


def test_a_config_saved_before_a_field_existed_still_resumes():
    from sparsejax import config, trainer

    new = config.to_dict(config.proxy_config("tiny", "relu"))
    old = json.loads(json.dumps(new))
    del old["model"]["scan_layers"]  # as written by a version without the field (default False)
    assert trainer.config_differences(old, new) == []
    changed = json.loads(json.dumps(new))
    changed["model"]["scan_layers"] = True
    assert trainer.config_differences(old, changed) == ["model.scan_layers"]


def test_checkpoint_steps_are_written_and_never_deleted(tmp_path):
    # The finding sweeps' log-spaced checkpoints: steps 3 and 7 are saved besides the regular
    # cadence (every 10) and survive keep_last=1, which deletes step 10 once 12 is written.
    _run(tmp_path, "train.steps=12", "train.checkpoint_steps=3,7", "train.checkpoint_every=10",
         "train.keep_last=1", "train.keep_every=100", "train.eval_every=1000", "train.log_every=4")
    assert checkpointing.finished_steps(tmp_path / "checkpoints") == [3, 7, 12]
    bad = _run(tmp_path / "bad", "train.steps=12", "train.checkpoint_steps=13", check=False)
    assert bad.returncode == 2 and "train.checkpoint_steps" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_xla_cpp_warnings_stay_off_the_console_unless_asked_for(tmp_path):
    """An fsdp mesh makes XLA's SPMD partitioner log a C++ WARNING ("Involuntary full
    rematerialization") while compiling; train.py keeps such glog-format lines off stderr, and an
    explicit TF_CPP_MIN_LOG_LEVEL=0 (debugging the compiler) still shows them."""
    import re

    glog = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d", re.M)
    sets = ["train.steps=2", "mesh.data=2", "mesh.fsdp=4", "train.checkpoint_every=2"]
    env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    quiet = subprocess.run(_cmd(tmp_path / "a", *sets), env=env, capture_output=True, text=True,
                           timeout=180, cwd=REPO)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert not glog.search(quiet.stderr), quiet.stderr[-3000:]
    loud = subprocess.run(_cmd(tmp_path / "b", *sets), env=dict(env, TF_CPP_MIN_LOG_LEVEL="0"),
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert glog.search(loud.stderr), "the mesh no longer makes XLA warn: this test checks nothing"
