"""Sweeps: grid expansion and validation, commands, collect, law fits, resume and failures."""

import csv
import importlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from sparsejax import config, flops, laws, sweep
from sparsejax.sweep import protocol, table

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/tiny_relu.py"
# A model small enough that train.py + eval.py take a few seconds each on one CPU device.
MICRO = ("model.d_model=32", "model.n_layers=1", "model.n_heads=1", "model.head_dim=32", "model.d_ff=80",
         "train.batch_size=4", "train.seq_len=32", "train.steps=12", "train.warmup_steps=2",
         "train.eval_batches=1", "train.eval_every=6", "train.checkpoint_every=6", "train.keep_every=6",
         "train.log_every=3")

# Stand-in for train.py: logs its invocation and its time span (start, end, XLA_FLAGS; it sleeps
# FAKE_TRAIN_SECONDS first, so that concurrent runs overlap), "resumes" by appending to
# metrics.jsonl, and fails for runs named in FAIL. Same command line as train.py.
FAKE_TRAIN = textwrap.dedent("""
    import argparse, json, os, pathlib, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--config"); p.add_argument("--workdir"); p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    sets = dict(s.split("=", 1) for s in a.set)
    wd = pathlib.Path(a.workdir)
    with open(wd.parents[1] / "invocations.txt", "a") as f:
        f.write(sets["name"] + "\\n")
    start = time.time()
    time.sleep(float(os.environ.get("FAKE_TRAIN_SECONDS", "0")))
    with open(wd.parents[1] / "spans.jsonl", "a") as f:
        f.write(json.dumps({"run": sets["name"], "start": start, "end": time.time(),
                            "xla_flags": os.environ.get("XLA_FLAGS", "")}) + "\\n")
    if sets["name"] in {FAIL}:
        print("boom: injected failure", file=sys.stderr)
        sys.exit(1)
    path = wd / "metrics.jsonl"
    done = len(path.read_text().splitlines()) if path.exists() else 0
    with path.open("a") as f:
        for s in range(done + 1, int(sets["train.steps"]) + 1):
            f.write(json.dumps({"step": s, "loss": 5.0 / s, "tokens_seen": 1000.0 * s,
                                "activation_ratio": 0.05 + 0.5 / s}) + "\\n")
    print("fake training done")
""")
FAKE_EVAL = textwrap.dedent("""
    import argparse, json, pathlib
    p = argparse.ArgumentParser()
    for flag in ("--workdir", "--checkpoints", "--metrics", "--out"):
        p.add_argument(flag)
    p.add_argument("--no-progress", action="store_true")
    a, _ = p.parse_known_args()
    out = pathlib.Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    ckpts = [{"step": s, "tokens_seen": 1000.0 * s, "dense_loss": 2.0,
              "results": {m: {"ratio": 0.1, "ppl_ratio": 1.0, "dead_share": 0.0} for m in a.metrics.split(",")}}
             for s in (4, 8)]
    out.write_text(json.dumps({"metrics": a.metrics.split(","), "checkpoints": ckpts}))
""")


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device: the runs are tiny
    return env


def _sweep_file(tmp_path, body, name="test_sweep.py"):
    path = tmp_path / name
    path.write_text("from sparsejax import sweep\n" + textwrap.dedent(body))
    return path


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sparsejax.sweep", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _two_run_sweep(common=("train.steps=8", "train.warmup_steps=2")):
    runs = sweep.cross(sweep.activation_points(["relu", "silu"]), config=TINY, common=common)
    return sweep.Sweep(name="two", runs=runs, eval=sweep.EvalOptions(metrics=("zero", "fat")))


# ---------------------------------------------------------------------------------------------
# Grid expansion and validation
# ---------------------------------------------------------------------------------------------
def test_cross_expands_axes_in_order_with_metadata():
    sizes = [sweep.proxy_size_point("tiny"),
             sweep.shape_point("mini", d_model=96, n_layers=4, n_heads=3, head_dim=32, d_ff=240)]
    runs = sweep.cross(sizes, sweep.activation_points(["relu", "silu"]), sweep.steps_points([50, 100]),
                       config=TINY, common=("train.warmup_steps=5",))
    assert [r.name for r in runs][:4] == ["tiny_relu_50steps", "tiny_relu_100steps", "tiny_silu_50steps",
                                          "tiny_silu_100steps"]
    assert len(runs) == 8
    mini = next(r for r in runs if r.name == "mini_silu_100steps")
    assert mini.overrides[0] == "train.warmup_steps=5" and mini.overrides[-1] == "train.steps=100"
    assert (mini.activation, mini.size, mini.width, mini.depth) == ("silu", "mini", 96, 4)

    resolved = sweep.resolve(sweep.Sweep(name="grid", runs=runs), ["train.batch_size=8"])
    r = next(r for r in resolved if r.name == "mini_silu_100steps")
    assert (r.activation, r.width, r.depth, r.steps, r.warmup_steps) == ("silu", 96, 4, 100, 5)
    assert r.tokens_per_step == 8 * 128 and r.overrides[0] == "name=mini_silu_100steps"
    assert r.params == flops.param_counts(config.ModelConfig(d_model=96, n_layers=4, n_heads=3, head_dim=32,
                                                             d_ff=240)).non_embedding


@pytest.mark.parametrize("override, field", [("model.d_modle=3", "model.d_modle"),
                                             ("train.schedule=bogus", "train.schedule"),
                                             ("model.n_layers=0", "model.n_layers")])
def test_resolve_error_names_the_run_and_the_field(override, field):
    runs = sweep.cross([sweep.Point("ok"), sweep.Point("bad", (override,))], config=TINY)
    with pytest.raises(sweep.SweepError, match=rf"run 'bad'.*{field}"):
        sweep.resolve(sweep.Sweep(name="s", runs=runs))


def test_resolve_rejects_inconsistent_metadata_and_bad_sweep_fields():
    wrong = sweep.Sweep(name="s", runs=(sweep.Run("r", TINY, ("model.d_model=64",), width=128),))
    with pytest.raises(sweep.SweepError, match=r"run 'r': declared width=128 but model.d_model=64"):
        sweep.resolve(wrong)
    runs = sweep.cross(sweep.activation_points(["relu"]), config=TINY)
    with pytest.raises(ValueError, match="metrics="):
        sweep.Sweep(name="s", runs=runs, eval=sweep.EvalOptions(metrics=("zero", "nope")))
    for kwargs, match in (({"eval": ("zero",)}, "must be an EvalOptions"),
                          ({"laws": {"relu": "nope"}}, r"laws\['relu'\]"),
                          ({"plots": ("nope",)}, "plots"),
                          ({"runs": runs + runs}, "duplicate run names")):
        with pytest.raises(sweep.SweepError, match=match):
            sweep.resolve(sweep.Sweep(name="s", **{"runs": runs, **kwargs}))
    with pytest.raises(sweep.SweepError, match="--only: unknown run"):
        sweep.select(sweep.resolve(sweep.Sweep(name="s", runs=runs)), "relu,nope")


def test_paper_sweeps_resolve():
    scale = sweep.load_sweep(REPO / "configs/sweeps/sparsing_law_scale.py")
    runs = sweep.resolve(scale)
    assert len(runs) == 10 and {r.activation for r in runs} == {"relu", "silu"}
    assert {r.size for r in runs} == {"0.1B", "0.2B", "0.4B", "0.8B", "1.2B"}

    wd = sweep.resolve(sweep.load_sweep(REPO / "configs/sweeps/sparsing_law_width_depth.py"))
    target = flops.param_counts(config.paper_config("0.1b").model).non_embedding
    assert len(wd) == 13 and [r.width for r in wd] == sorted(r.width for r in wd)
    assert (wd[0].width, wd[0].depth, wd[-1].width, wd[-1].depth) == (128, 575, 2048, 2)
    for r in wd:
        assert abs(r.params / target - 1) < 0.12, r.name  # 2048/2 is -11%, as in the paper
        assert r.config_dict["model"]["d_ff"] == 2.5 * r.width
        assert r.config_dict["model"]["n_heads"] == max(1, r.width // 128)
    assert sum(abs(r.params / target - 1) < 0.05 for r in wd) == 12


def test_proxy_sweep_resolves_to_four_runs():
    runs = sweep.resolve(sweep.load_sweep(REPO / "configs/sweeps/cpu_proxy.py"))
    assert [r.name for r in runs] == ["tiny_relu", "tiny_silu", "mini_relu", "mini_silu"]
    assert all(r.config_dict["train"]["keep_every"] == 100 for r in runs)


def test_cpu_finding_sweeps_resolve_to_their_documented_grids():
    """configs/sweeps/cpu_width_depth.py, cpu_scale.py, cpu_activations.py (Sparsing Law findings)."""
    wd = sweep.resolve(sweep.load_sweep(REPO / "configs/sweeps/cpu_width_depth.py"))
    assert len(wd) == 8 and [r.config_dict["train"]["seed"] for r in wd] == [0, 1] * 4
    assert [(r.width, r.depth) for r in wd[::2]] == [(16, 8), (24, 4), (32, 2), (48, 1)]
    for r in wd:  # fixed parameter count: within 7% of 25k, counted independently of flops.py
        m = r.config_dict["model"]
        attention = 4 * m["d_model"] * m["n_heads"] * m["head_dim"]
        per_layer = attention + 3 * m["d_model"] * m["d_ff"] + 2 * m["d_model"]  # gated FFN, 2 norms
        assert r.params == m["n_layers"] * per_layer + m["d_model"]
        assert abs(r.params / 25_000 - 1) < 0.07, r.name
        assert r.activation == "relu" and m["d_ff"] == 2.5 * r.width and m["ffn_type"] == "gated"

    scale = sweep.resolve(sweep.load_sweep(REPO / "configs/sweeps/cpu_scale.py"))
    assert len(scale) == 8 and {r.activation for r in scale} == {"relu", "silu"}
    assert {r.width / r.depth for r in scale} == {4.0}
    params = sorted({r.params for r in scale})
    assert len(params) == 4 and params[-1] / params[0] > 20

    acts = sweep.resolve(sweep.load_sweep(REPO / "configs/sweeps/cpu_activations.py"))
    variants = {(r.config_dict["model"]["ffn_type"], r.activation) for r in acts}
    assert variants == {("plain", "relu"), ("plain", "relu2"), ("plain", "silu"), ("plain", "gelu"),
                        ("gated", "relu"), ("gated", "silu"), ("gated", "drelu")}
    assert len(acts) == 14 and len({r.params for r in acts}) == 1  # plain d_ff = 1.5 × gated: same count
    for runs in (wd, scale, acts):
        for r in runs:  # the protocol's log-spaced checkpoints are kept (and evaluated), and the last
            t = r.config_dict["train"]
            assert t["keep_every"] == t["steps"] and t["keep_last"] == 1 and t["schedule"] == "constant"
            assert len(t["checkpoint_steps"]) == 12 and t["checkpoint_steps"][-1] == t["steps"]


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_print_commands_lists_local_and_tpu_commands_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _cli(REPO / "configs/sweeps/cpu_proxy.py", "--out", out, "--print-commands", "--set", "train.steps=50")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    train = [x for x in lines if "train.py" in x and not x.startswith("gcloud")]
    evals = [x for x in lines if "eval.py" in x and not x.startswith("gcloud")]
    tpu = [x for x in lines if x.startswith("gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE")]
    assert len(train) == len(evals) == 4 and len(tpu) == 8
    assert "--workdir " + str(out.resolve() / "runs" / "tiny_silu") in train[1]
    assert "--set model.activation=silu" in train[1] and train[1].endswith("--set train.steps=50")
    assert "--metrics zero,fat,cett_ppl" in evals[0]
    assert '--worker=all --command="cd sparsejax && python train.py --config configs/tiny_relu.py' in tpu[0]
    assert "--worker=0" in tpu[1] and "python eval.py" in tpu[1]
    assert not out.exists()

    proc = _cli(REPO / "configs/sweeps/cpu_proxy.py", "--out", out, "--print-commands", "--skip-eval",
                "--only", "mini_relu")
    local = proc.stdout.split("# TPU VM")[0]
    assert local.count("train.py") == 1 and "eval.py" not in local


@pytest.mark.slow
def test_cli_bad_override_exits_2_naming_run_and_field(tmp_path):
    proc = _cli(REPO / "configs/sweeps/cpu_proxy.py", "--out", tmp_path, "--set", "train.shedule=wsd")
    assert proc.returncode == 2 and "run 'tiny_relu'" in proc.stderr and "train.shedule" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Collect and fit
# ---------------------------------------------------------------------------------------------
def _write_fake_run(out, run, metrics, results=None):
    wd = out / "runs" / run.name
    wd.mkdir(parents=True)
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if results is not None:
        (wd / "eval").mkdir()
        (wd / "eval" / "results.json").write_text(json.dumps(results))


def test_collect_builds_the_tidy_table(tmp_path):
    relu, silu = sweep.resolve(_two_run_sweep())
    _write_fake_run(tmp_path, relu, [
        {"step": 1, "loss": 5.0, "tokens_seen": 2048.0, "activation_ratio": 0.5},
        {"step": 2, "loss": 9.9, "tokens_seen": 4096.0, "activation_ratio": 0.9},  # replaced below
        {"step": 2, "loss": 4.0, "tokens_seen": 4096.0, "activation_ratio": 0.4},
        {"step": 2, "eval_loss": 4.5, "eval_perplexity": 90.0},
    ], {"metrics": ["zero", "cett_ppl"], "checkpoints": [
        {"step": 2, "tokens_seen": 4096.0, "dense_loss": 4.4,
         "results": {"zero": {"ratio": 0.42, "ppl_ratio": 1.0, "dead_share": 0.1, "ratio_layers": [0.42]},
                     "cett_ppl": {"ratio": 0.07, "ppl_ratio": 1.01, "dead_share": 0.3}}}]})
    # silu has no eval yet and no activation logging
    _write_fake_run(tmp_path, silu, [{"step": 1, "loss": 5.5, "tokens_seen": 2048.0}])
    rows = sweep.collect(tmp_path, [relu, silu])
    assert all(tuple(r) == sweep.COLUMNS for r in rows)
    table = {(r["run"], r["step"], r["metric"]): (r["tokens"], r["value"]) for r in rows}
    assert table[("relu", 1, "train_activation_ratio")] == (2048.0, 0.5)
    assert table[("relu", 2, "train_loss")] == (4096.0, 4.0)
    assert table[("relu", 2, "eval_loss")] == (4096.0, 4.5)
    assert table[("relu", 2, "zero_ratio")] == (4096.0, 0.42)
    assert table[("relu", 2, "cett_ppl_ratio")] == (4096.0, 0.07)
    assert table[("relu", 2, "cett_ppl_ppl_ratio")] == (4096.0, 1.01)
    assert table[("relu", 2, "eval_dense_loss")] == (4096.0, 4.4)
    assert table[("silu", 1, "train_loss")] == (2048.0, 5.5)
    assert len(rows) == 4 + 1 + 1 + 6 + 1
    first = next(r for r in rows if r["run"] == "relu")
    assert (first["activation"], first["size"], first["width"], first["depth"], first["params"]) == (
        "relu", "", 128, 5, relu.params)
    sweep.write_table(rows, tmp_path)
    assert (tmp_path / "table.csv").read_text().splitlines()[0] == ",".join(sweep.COLUMNS)
    assert json.loads((tmp_path / "table.json").read_text()) == rows
    from sparsejax.sweep import table as table_lib

    assert table_lib.load_table(tmp_path) == rows
    # A sweep directory with the table under its older names (results.json / results.csv) still
    # loads; an eval.py results.json (an object, another schema) is never taken for a table.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "results.json").write_text(json.dumps(rows))
    assert table_lib.load_table(legacy) == rows
    (legacy / "results.json").write_text(json.dumps({"checkpoints": []}))
    with pytest.raises(FileNotFoundError, match="table.json does not exist"):
        table_lib.load_table(legacy)


def _law_rows(run, law, params, steps, noise=0.0, seed=0):
    D = np.array(steps) * run.tokens_per_step / 1e9
    ratio = laws.get_law(law)(D, *params) + noise * np.random.default_rng(seed).standard_normal(len(D))
    return [table._row(run, d * 1e9, s, "train_activation_ratio", v) for s, d, v in zip(steps, D, ratio)]


@pytest.mark.slow
def test_fits_recover_known_law_parameters_and_skip_warmup(tmp_path):
    relu, silu = sweep.resolve(_two_run_sweep(("train.warmup_steps=20", "train.batch_size=512",
                                               "train.seq_len=256")))
    steps = list(range(25, 5000, 25))  # D from 3.3e-3 to 0.65
    true_relu, true_silu = (0.5, -1.0, 3.0, 0.07), (0.5, 0.01, 0.40)
    rows = _law_rows(relu, "relu_ratio", true_relu, steps) + _law_rows(silu, "silu_ratio", true_silu, steps)
    # warm-up points that would wreck both fits if they were used
    rows += [table._row(r, s * r.tokens_per_step, s, "train_activation_ratio", 0.99) for r in (relu, silu)
             for s in range(1, 21)]
    fits = sweep.fit_runs(rows, [relu, silu], laws.PUBLISHED_LAW, n_boot=10)
    assert [(f.run.name, f.law, f.status) for f in fits] == [("relu", "relu_ratio", "ok"),
                                                             ("silu", "silu_ratio", "ok")]
    for fit, true in zip(fits, (true_relu, true_silu)):
        np.testing.assert_allclose(fit.result.param_array, true, rtol=1e-4)
        assert fit.result.r2 > 0.9999 and len(fit.D) == len(steps)
        d = fit.to_dict()
        assert d["bootstrap_block"] == len(steps) // 10  # per-step in-graph points: moving blocks
        assert d["success"] and set(d["ci_lo"]) == set(laws.get_law(fit.law).param_names)
        assert all(d["ci_lo"][k] <= d["params_fit"][k] + 1e-9 <= d["ci_hi"][k] + 2e-9 for k in d["ci_lo"])
    assert fits[0].trend()["direction"] == "falls" and fits[1].trend()["direction"] == "rises"
    parallel = sweep.fit_runs(rows, [relu, silu], laws.PUBLISHED_LAW, n_boot=10, workers=2)
    assert [f.to_dict() for f in parallel] == [f.to_dict() for f in fits]  # seeded: same fits, same CIs


def test_noisy_fit_has_ci_covering_the_limit():
    (relu, _) = sweep.resolve(_two_run_sweep(("train.batch_size=512", "train.seq_len=256")))
    rows = _law_rows(relu, "relu_ratio", (0.5, -1.0, 3.0, 0.07), list(range(25, 5000, 25)), noise=2e-3)
    (fit,) = sweep.fit_runs(rows, [relu], laws.PUBLISHED_LAW, n_boot=40)
    lo, hi = fit.result.ci["A0"]
    assert fit.status == "ok" and lo < hi and lo - 0.01 < 0.07 < hi + 0.01


def test_failed_and_skipped_fits_are_reported(tmp_path):
    relu, silu = sweep.resolve(_two_run_sweep())
    rows = [table._row(relu, 1000 * s, s, "train_activation_ratio", 0.3) for s in (3, 4, 5)]  # too few
    rows += [table._row(silu, 1000 * s, s, "zero_ratio", 1.0) for s in range(3, 20)]
    rows += [table._row(relu, 1000 * s, s, "fat_ratio", 0.3) for s in range(3, 20)]
    fits = sweep.fit_runs(rows, [relu, silu], {"silu": "silu_ratio"}, n_boot=0)
    status = {(f.run.name, f.metric): (f.status, f.message) for f in fits}
    assert status[("relu", "train_activation_ratio")][0] == "skipped"  # no law for relu here
    assert status[("silu", "zero_ratio")][0] == "skipped"
    # fat_ratio of relu: values outside [0, 1] make the law's data check fail
    rows += [table._row(relu, 1000 * s, s, "fat_ratio", 1.5) for s in range(20, 25)]
    fits = sweep.fit_runs(rows, [relu, silu], laws.PUBLISHED_LAW, n_boot=0)
    status = {(f.run.name, f.metric): (f.status, f.message) for f in fits}
    # 3 points after warm-up where the ReLU law has 4 parameters: not fitted, and said why
    assert status[("relu", "train_activation_ratio")] == (
        "skipped", "3 point(s) after warm-up; the relu_ratio law needs 5 (evaluate more checkpoints to "
        "fit this metric)")
    assert status[("relu", "fat_ratio")][0] == "failed"
    failed = next(f for f in fits if (f.run.name, f.metric) == ("relu", "fat_ratio"))
    d = failed.to_dict()
    assert d["success"] is False and d["params_fit"] is None and "FAILED" in sweep.format_fit(failed)


# ---------------------------------------------------------------------------------------------
# Runner: resume, failures
# ---------------------------------------------------------------------------------------------
def _fake_scripts(tmp_path, fail=()):
    train, evaluate = tmp_path / "fake_train.py", tmp_path / "fake_eval.py"
    train.write_text(FAKE_TRAIN.replace("{FAIL}", repr(set(fail) or {"-"})))
    evaluate.write_text(FAKE_EVAL)
    return train, evaluate


@pytest.mark.slow
def test_resume_skips_a_complete_run_and_finishes_a_half_finished_one(tmp_path):
    fake_train, fake_eval = _fake_scripts(tmp_path)
    spec = _two_run_sweep()
    relu, silu = sweep.resolve(spec)
    out = tmp_path / "out"
    cmds = {"train_cmd": lambda run, wd: sweep.train_command(run, wd, script=fake_train),
            "eval_cmd": lambda run, wd, o: sweep.eval_command(run, wd, o, script=fake_eval)}
    first = sweep.execute(spec, [relu], out, progress=False, log=lambda _: None, **cmds)
    assert [o.status for o in first] == ["done"]
    marker = out / "runs" / "relu" / sweep.MARKER
    assert json.loads(marker.read_text())["config"] == relu.config_dict
    mtime = marker.stat().st_mtime_ns
    # silu: killed half-way (metrics of 3 of 8 steps, no marker)
    (out / "runs" / "silu").mkdir()
    (out / "runs" / "silu" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0, "tokens_seen": 1000.0 * s}) + "\n" for s in (1, 2, 3)))
    logged = []
    outcomes = sweep.execute(spec, [relu, silu], out, progress=False, log=logged.append, **cmds)
    assert [(o.run, o.status) for o in outcomes] == [("relu", "skipped"), ("silu", "done")]
    assert "[1/2] relu: complete, skipped" in logged
    assert (out / "invocations.txt").read_text().split() == ["relu", "silu"]  # relu trained once
    assert marker.stat().st_mtime_ns == mtime
    steps = [json.loads(x)["step"] for x in (out / "runs" / "silu" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert sweep.eval_done(out / "runs" / "silu", spec.eval.metrics)
    # a changed config is not "complete": training runs again
    changed = sweep.resolve(spec, ["train.steps=9"])
    assert [o.status for o in sweep.execute(spec, changed[:1], out, progress=False, log=lambda _: None,
                                            **cmds)] == ["done"]


@pytest.mark.slow
def test_jobs_run_side_by_side_single_threaded_and_resume(tmp_path):
    train = tmp_path / "fake_train.py"
    train.write_text(FAKE_TRAIN.replace("{FAIL}", repr({"-"})))
    evaluate = _fake_scripts(tmp_path)[1]
    spec = _two_run_sweep()
    runs = sweep.resolve(spec)
    out = tmp_path / "out"
    cmds = {"train_cmd": lambda run, wd: sweep.train_command(run, wd, script=train),
            "eval_cmd": lambda run, wd, o: sweep.eval_command(run, wd, o, script=evaluate)}
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "FAKE_TRAIN_SECONDS": "1.5"}
    logged = []
    outcomes = sweep.execute(spec, runs, out, progress=True, log=logged.append, jobs=2, env=env, **cmds)
    assert [(o.run, o.status) for o in outcomes] == [("relu", "done"), ("silu", "done")]  # run order
    spans = {s["run"]: s for s in map(json.loads, (out / "spans.jsonl").read_text().splitlines())}
    assert set(spans) == {"relu", "silu"}
    assert max(s["start"] for s in spans.values()) < min(s["end"] for s in spans.values()), "not concurrent"
    for s in spans.values():  # each child held to one thread, the caller's flags kept
        assert s["xla_flags"] == "--xla_force_host_platform_device_count=1 " + sweep.SINGLE_THREAD_XLA_FLAGS
    for run in runs:
        assert sweep.train_done(out / "runs" / run.name, run)
        assert sweep.eval_done(out / "runs" / run.name, spec.eval.metrics)
    assert sum("training" in line for line in logged) == 2
    # Resumed with jobs=2: both complete, nothing started again.
    again = sweep.execute(spec, runs, out, progress=False, log=lambda _: None, jobs=2, env=env, **cmds)
    assert [o.status for o in again] == ["skipped", "skipped"]
    assert len((out / "spans.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("args,message", [
    (("--jobs", "0"), "--jobs=0 must be >= 1"),
    (("--jobs", "2", "--launch", "tpu-vm"), "--jobs=2 applies to --launch local"),
])
def test_bad_jobs_is_one_line_exit_2(tmp_path, args, message):
    path = _sweep_file(tmp_path, """
        def get_sweep():
            runs = sweep.cross(sweep.activation_points(["relu"]), config="configs/tiny_relu.py")
            return sweep.Sweep(name="jobs", runs=runs)
    """)
    proc = _cli(path, "--out", tmp_path / "out", *args)
    assert proc.returncode == 2 and proc.stderr.strip() == f"sweep error: {message}" + (
        "; --launch tpu-vm submits one job per run" if "launch" in message else "")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_marker_from_older_code_still_counts_as_done(tmp_path):
    """A marker written before a config field existed (the field missing from its saved config) is
    read with that field's default and still names the run; a different value, a section this code
    does not know or a torn marker do not."""
    relu = sweep.resolve(_two_run_sweep())[0]
    workdir = tmp_path / "relu"
    workdir.mkdir()

    def write(cfg):
        (workdir / sweep.MARKER).write_text(json.dumps({"run": "relu", "config": cfg}))

    older = json.loads(json.dumps(relu.config_dict))
    del older["sparsity"]  # as written before the section existed
    del older["train"]["warm_start"]
    write(older)
    assert sweep.train_done(workdir, relu)
    changed = json.loads(json.dumps(relu.config_dict))
    changed["train"]["steps"] += 1
    write(changed)
    assert not sweep.train_done(workdir, relu)
    write({**relu.config_dict, "optimiser": {}})
    assert not sweep.train_done(workdir, relu)
    write({**relu.config_dict, "train": {**relu.config_dict["train"], "steps": "eight"}})
    assert not sweep.train_done(workdir, relu)
    (workdir / sweep.MARKER).write_text('{"run": "relu", "config": {"mod')
    assert not sweep.train_done(workdir, relu)


@pytest.mark.slow
def test_failing_run_is_reported_and_the_sweep_goes_on(tmp_path):
    fake_train, fake_eval = _fake_scripts(tmp_path, fail=("relu",))
    path = _sweep_file(tmp_path, """
        def get_sweep():
            runs = sweep.cross(sweep.activation_points(["relu", "silu"]), config="configs/tiny_relu.py",
                               common=("train.steps=30", "train.warmup_steps=2"))
            return sweep.Sweep(name="fails", runs=runs, eval=sweep.EvalOptions(metrics=("zero", "fat")))
    """)
    out = tmp_path / "out"
    proc = _cli(path, "--out", out, "--train-script", fake_train, "--eval-script", fake_eval, "--n-boot", "5")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[1/2] relu: FAILED: train.py exited 1" in proc.stdout and "boom: injected failure" in proc.stdout
    assert "summary: 2 runs: 1 done, 0 skipped, 1 failed" in proc.stdout
    assert "FAILED relu: train.py exited 1" in proc.stdout
    assert not (out / "runs" / "relu" / sweep.MARKER).exists()
    assert (out / "runs" / "silu" / sweep.MARKER).exists()
    fits = json.loads((out / "fits.json").read_text())
    assert {(f["run"], f["metric"]) for f in fits} == {("silu", "train_activation_ratio"), ("silu", "fat_ratio"),
                                                       ("silu", "zero_ratio")}
    manifest, runs = sweep.load_manifest(out)
    assert manifest["name"] == "fails" and [r.name for r in runs] == ["relu", "silu"]


@pytest.mark.slow
def test_real_train_and_eval_end_to_end_then_everything_skipped(tmp_path):
    path = _sweep_file(tmp_path, f"""
        def get_sweep():
            runs = sweep.cross(sweep.activation_points(["relu", "silu"]), config="configs/tiny_relu.py",
                               common={MICRO!r})
            return sweep.Sweep(name="micro", runs=runs, eval=sweep.EvalOptions(metrics=("zero", "fat")))
    """)
    out = tmp_path / "out"
    proc = _cli(path, "--out", out, "--n-boot", "5", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((out / "table.json").read_text())
    metrics = {(r["run"], r["metric"]) for r in rows}
    for run in ("relu", "silu"):
        assert {(run, m) for m in ("train_loss", "train_activation_ratio", "eval_loss", "zero_ratio",
                                   "fat_ratio")} <= metrics
    assert sorted({r["step"] for r in rows if r["run"] == "relu" and r["metric"] == "fat_ratio"}) == [6, 12]
    assert [r["step"] for r in rows if r["run"] == "silu" and r["metric"] == "train_loss"] == list(range(1, 13))
    fits = json.loads((out / "fits.json").read_text())
    assert {f["status"] for f in fits} <= {"ok", "failed", "skipped"} and len(fits) == 6
    assert (out / "plots" / "ratio_vs_tokens_relu_train_activation_ratio.png").stat().st_size > 1000
    assert (out / "plots" / "ratio_vs_tokens_silu_fat_ratio.pdf").stat().st_size > 1000
    assert (out / "plots" / "loss_vs_tokens.png").exists()
    train_log = (out / "runs" / "relu" / "train.log").read_text()

    again = _cli(path, "--out", out, "--n-boot", "5", "--no-progress")
    assert again.returncode == 0 and "[1/2] relu: complete, skipped" in again.stdout
    assert "summary: 2 runs: 0 done, 2 skipped, 0 failed" in again.stdout
    assert (out / "runs" / "relu" / "train.log").read_text() == train_log


@pytest.mark.slow
def test_limit_plots_use_identified_limits_only(tmp_path):
    shapes = [sweep.shape_point(f"w{w}", d_model=w, n_layers=l, n_heads=1, head_dim=32, d_ff=int(2.5 * w))
              for w, l in ((64, 8), (96, 4), (128, 2), (192, 1))]
    runs = sweep.resolve(sweep.Sweep(name="wd", runs=sweep.cross(
        shapes, sweep.activation_points(["relu"]), config=TINY,
        common=("train.batch_size=512", "train.seq_len=256", "train.warmup_steps=20"))))
    steps = list(range(25, 5000, 50))
    rows = [row for i, r in enumerate(runs) for row in _law_rows(r, "relu_ratio", (0.5, -1.0, 3.0, 0.05 + 0.01 * i), steps)]
    silu = sweep.resolve(_two_run_sweep(("train.batch_size=512", "train.seq_len=256")))[1]
    rows += _law_rows(silu, "silu_ratio", (0.5, 0.01, 1.0), steps)  # limit at the law's upper bound
    fits = sweep.fit_runs(rows, [*runs, silu], laws.PUBLISHED_LAW, n_boot=0)
    assert [f.at_bounds() for f in fits] == [[], [], [], [], ["A0"]]
    assert "at bound (not identified): A0" in sweep.format_fit(fits[-1])
    pngs = sweep.make_plots(rows, [*runs, silu], fits, tmp_path, sweep.PLOT_KINDS)
    names = {p.name for p in pngs}
    assert {"limit_vs_width_depth_relu_train_activation_ratio.png", "limit_vs_params_train_activation_ratio.png",
            "ratio_vs_tokens_silu_train_activation_ratio.png"} <= names  # no train_loss rows: no loss plot
    assert all(p.exists() and p.with_suffix(".pdf").exists() for p in pngs)
    assert "limit_vs_width_depth_silu_train_activation_ratio.png" not in names  # its only A0 is at a bound


def test_bootstrap_blocks_of_per_step_and_per_checkpoint_series():
    assert sweep.bootstrap_block("train_activation_ratio", 117) == 11
    assert sweep.bootstrap_block("train_activation_ratio", 7) == 1
    # checkpoint series: blocks of round(n^(1/3)) from 8 points (the protocol's 11 post-warm-up: 2)
    assert sweep.bootstrap_block("cett_ppl_ratio", 11) == 2 and sweep.bootstrap_block("zero_ratio", 27) == 3
    assert sweep.bootstrap_block("cett_ppl_ratio", 7) == 1 and sweep.bootstrap_block("zero_ratio", 2) == 1


def test_load_sweep_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(sweep.SweepError, match="sweep file .*nope.py' does not exist"):
        sweep.load_sweep(tmp_path / "nope.py")
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(sweep.SweepError, match=r"defines no get_sweep\(\)"):
        sweep.load_sweep(tmp_path / "empty.py")
    (tmp_path / "wrong.py").write_text("def get_sweep():\n    return [1, 2]\n")
    with pytest.raises(sweep.SweepError, match=r"get_sweep\(\) returned list, expected Sweep"):
        sweep.load_sweep(tmp_path / "wrong.py")


@pytest.mark.slow
def test_sweep_files_load_without_jax_or_scipy():
    code = ("import sys, pathlib; from sparsejax import sweep\n"
            "for f in sorted(pathlib.Path('configs/sweeps').glob('*.py')):\n"
            "    s = sweep.load_sweep(f); assert s.runs and isinstance(s.eval, sweep.EvalOptions)\n"
            "print(sorted(m for m in ('jax', 'scipy', 'flax', 'optax') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_eval_options_round_trip_through_eval_py_flags():
    from sparsejax import eval_options

    opts = sweep.EvalOptions(metrics=("zero", "cett_ppl"), ppl_p=2.0, joint_last=3,
                             cett_ppl_mode="per_checkpoint", topk=64)
    argv = eval_options.to_argv(opts)
    sys.path.insert(0, str(REPO))
    eval_py = importlib.import_module("eval")
    args = eval_py.parse_args(["--workdir", "w", *argv])
    assert eval_options.from_flags({f: getattr(args, f) for f in eval_options.FLAGS}) == opts
    # the parser's defaults are EvalOptions' defaults
    args = eval_py.parse_args(["--workdir", "w"])
    assert eval_options.from_flags({f: getattr(args, f) for f in eval_options.FLAGS}) == sweep.EvalOptions()


# ---------------------------------------------------------------------------------------------
# Publishing a finished sweep into the repository (--publish)
# ---------------------------------------------------------------------------------------------
def test_publish_thins_training_rows_and_round_trips_through_the_csv(tmp_path):
    from sparsejax.sweep import cli, publish, table
    from sparsejax.sweep.runner import MARKER

    spec = _two_run_sweep()
    relu, silu = runs = sweep.resolve(spec)
    out, dest = tmp_path / "out", tmp_path / "published"
    for run, n_steps in ((relu, 450), (silu, 150)):
        metrics = [{"step": s, "loss": 5.0 - s / 1000, "tokens_seen": 64.0 * s, "activation_ratio": 0.5 - s / 10_000}
                   for s in range(1, n_steps + 1)]
        _write_fake_run(out, run, metrics, {"metrics": ["zero"], "seconds": 12.5, "checkpoints": [
            {"step": s, "tokens_seen": 64.0 * s, "dense_loss": 4.0,
             "results": {"zero": {"ratio": 0.3 if s < 100 else float("nan"), "ppl_ratio": 1.0, "dead_share": 0.0}}}
            for s in (10, 100, n_steps)]})
        (out / "runs" / run.name / MARKER).write_text(json.dumps({"seconds": 30.25, "finished": "now"}))
    cli.write_manifest(spec, runs, out)
    (out / "fits.json").write_text("[]")
    rows = sweep.collect(out, runs)
    publish.publish(out, dest, rows, runs)

    assert sorted(p.name for p in dest.iterdir()) == ["fits.json", "plateaus.csv", "provenance.json", "sweep.json",
                                                       "table.csv"]
    # the plateau tests: ReLU's zero ratio has one finite point after warm-up (too few: undetermined);
    # SiLU has no exact zeros and neither run a CETT-PPL ratio, so nothing else is written
    with open(dest / "plateaus.csv", newline="") as f:
        plateaus = list(csv.DictReader(f))
    assert [(p["run"], p["metric"], p["verdict"], float(p["level"]), p["slope_lo"], p["n_points"]) for p in plateaus] == [
        ("relu", "zero_ratio", protocol.UNDETERMINED, 0.3, "", "1")]
    back = table.load_table(dest)  # no table.json there: read from the CSV, typed
    expected = publish.thin(rows)
    for row in expected:
        if row["value"] != row["value"]:
            row["value"] = None  # NaN is written as an empty cell and read back as null, as in the JSON
    assert back == expected
    steps = {name: sorted(r["step"] for r in back if r["run"] == name and r["metric"] == "train_loss")
             for name in ("relu", "silu")}
    assert len(steps["relu"]) <= publish.MAX_TRAIN_POINTS and steps["relu"][-1] == 450  # thinned, last kept
    assert steps["silu"] == list(range(1, 151))  # under the cap: every step
    assert sum(r["metric"] == "zero_ratio" for r in back) == 6  # every eval row, NaN included (as null)
    prov = json.loads((dest / "provenance.json").read_text())
    assert len(prov["commit"]) == 40 and prov["machine"]["cores"] == os.cpu_count()
    assert prov["runs"]["relu"] == {"train_seconds": 30.2, "finished": "now", "eval_seconds": 12.5}
    assert json.loads((dest / "sweep.json").read_text()) == json.loads((out / "sweep.json").read_text())


def test_plateau_rows_give_each_run_its_verdict_from_the_post_warmup_checkpoints():
    """A flat series plateaus, a falling one has not reached its limit, a noisy one is undetermined;
    points before warm-up are not read. Levels against numpy's mean of the last decade."""
    from sparsejax.sweep import publish

    rng = np.random.default_rng(0)
    runs = [types.SimpleNamespace(name=n, activation=a, warmup_steps=5)
            for n, a in (("flat", "relu"), ("falling", "silu"), ("noisy", "silu"))]
    steps = np.unique(np.geomspace(10, 10_000, 12).round().astype(int))
    series_of = {"flat": 0.2 + 0.0002 * rng.standard_normal(len(steps)),
                 "falling": 0.5 - 0.1 * np.log10(steps / 10),
                 "noisy": 0.3 + 0.2 * rng.standard_normal(len(steps))}
    rows = [{"run": n, "step": int(s), "tokens": 100.0 * s, "metric": "cett_ppl_ratio", "value": float(v)}
            for n, vals in series_of.items() for s, v in zip(steps, vals)]
    rows += [{"run": "flat", "step": 1, "tokens": 100.0, "metric": "cett_ppl_ratio", "value": 5.0}]  # warm-up
    rows += [{"run": "flat", "step": int(s), "tokens": 100.0 * s, "metric": "zero_ratio", "value": 0.3}
             for s in steps]
    got = {(p["run"], p["metric"]): p for p in publish.plateau_rows(rows, runs)}
    assert set(got) == {("flat", "cett_ppl_ratio"), ("flat", "zero_ratio"), ("falling", "cett_ppl_ratio"),
                        ("noisy", "cett_ppl_ratio")}  # SiLU: no zero criterion
    assert got["flat", "cett_ppl_ratio"]["verdict"] == protocol.PLATEAU
    assert got["falling", "cett_ppl_ratio"]["verdict"] == protocol.MOVING
    assert got["noisy", "cett_ppl_ratio"]["verdict"] == protocol.UNDETERMINED
    last = steps >= steps.max() / 10
    assert got["flat", "cett_ppl_ratio"]["level"] == pytest.approx(series_of["flat"][last].mean())
    assert got["falling", "cett_ppl_ratio"]["slope_per_decade"] == pytest.approx(-0.1)
    assert got["flat", "cett_ppl_ratio"]["n_points"] == int(last.sum())


def test_publish_refuses_a_sweep_with_runs_missing_and_writes_nothing(tmp_path):
    sweep_file = _sweep_file(tmp_path, """
        def get_sweep():
            runs = sweep.cross(sweep.activation_points(["relu", "silu"]), config="configs/tiny_relu.py",
                               common=("train.steps=8", "train.warmup_steps=2"))
            return sweep.Sweep(name="two", runs=runs, eval=sweep.EvalOptions(metrics=("zero",)))
    """)
    out, dest = tmp_path / "out", tmp_path / "published"
    (relu, _silu) = sweep.resolve(sweep.load_sweep(sweep_file))
    _write_fake_run(out, relu, [{"step": 1, "loss": 5.0, "tokens_seen": 64.0, "activation_ratio": 0.5}])
    proc = _cli(sweep_file, "--out", out, "--collect-only", "--publish", dest, "--n-boot", "0")
    assert proc.returncode == 1, proc.stderr
    assert "not published to" in proc.stderr and "silu" in proc.stderr
    assert not dest.exists()


@pytest.mark.parametrize("dest,needle", [
    ("FILE", "exists and is not a directory"),
    ("OUT", "is the sweep directory itself"),
    ("gs://bucket/results", "--publish gs://bucket/results: a local directory"),
])
def test_publish_destination_is_checked_before_anything_runs(tmp_path, dest, needle):
    out = tmp_path / "out"
    (tmp_path / "file").write_text("not a directory")
    dest = {"FILE": tmp_path / "file", "OUT": out}.get(dest, dest)
    proc = _cli(REPO / "configs" / "sweeps" / "cpu_scale.py", "--out", out, "--publish", dest)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_log_lines_stay_whole_across_threads():
    """Two runs logging at once (``--jobs 2``): each message and its newline are written together
    (``print`` writes them separately, so unguarded lines interleave mid-line)."""
    import threading
    import time

    from sparsejax.sweep import runner

    out = []

    def slow_print(message):  # like print: the text, a pause, then the newline
        out.append(message)
        time.sleep(0.01)
        out.append("\n")

    say = runner._whole_lines(slow_print)
    threads = [threading.Thread(target=lambda n=n: [say(f"run{n}-{i}") for i in range(5)])
               for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = "".join(out).splitlines()
    assert sorted(lines) == sorted(f"run{n}-{i}" for n in range(2) for i in range(5))


@pytest.mark.parametrize("published", sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "results")
                                             .glob("cpu_*")), ids=lambda p: p.name)
def test_committed_plateau_verdicts_are_those_of_the_committed_table(published):
    """Every published sweep carries each run's plateau verdicts (plateaus.csv), and they are what
    the plateau test gives on its committed table today."""
    from sparsejax.sweep import publish

    _, runs = sweep.load_manifest(published)
    expected = publish.plateau_rows(table.load_table(published), runs)
    with open(published / publish.PLATEAUS_CSV, newline="") as f:
        committed = list(csv.DictReader(f))
    assert [(r["run"], r["metric"], r["verdict"]) for r in committed] == [
        (r["run"], r["metric"], r["verdict"]) for r in expected]
    assert {r["run"] for r in committed} == {r.name for r in runs}
    for c, e in zip(committed, expected):
        assert float(c["level"]) == pytest.approx(e["level"], rel=1e-12)
