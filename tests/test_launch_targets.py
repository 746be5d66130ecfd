"""The launcher-target table (``sparsejax.launch.targets``) as both CLIs read it: the same
targets, the same options, one ``--max-restarts`` default shown in both helps and used by both."""

import json
import re
import shlex
import subprocess
import sys
import types

import pytest
import yaml

from fake_gcs import install
from sparsejax import config as config_lib
from sparsejax import configure
from sparsejax.launch import cli, jobs, targets
from sparsejax.sweep import cli as sweep_cli
from sparsejax.sweep.resolved import REPO

TRAIN_ARGS = ["--config", "configs/sparsing_law_0.1b.py", "--workdir", "gs://bucket/runs/r"]


def _choices(help_text: str, usage_word: str) -> list[str]:
    """The {a,b,c} choices argparse prints after ``usage_word`` in a usage line."""
    match = re.search(re.escape(usage_word) + r"\s*\{([^}]*)\}", help_text)
    assert match, help_text
    return match.group(1).split(",")


def _launch(*argv):
    return subprocess.run([sys.executable, "-m", "sparsejax.launch", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _help(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_both_clis_list_the_targets_of_the_table(capsys):
    assert list(targets.TARGETS) == ["local", "tpu-vm", "xpk", "jobset"]
    assert targets.sweep_targets() == ("local", "tpu-vm", "xpk")
    p = _launch("--help")  # the real command line
    assert p.returncode == 0, p.stderr
    assert _choices(p.stdout, "launch [-h]") == [*targets.TARGETS, "job"]
    sweep_help = _help(sweep_cli.parse_args, ["--help"], capsys)
    assert _choices(sweep_help, "--launch") == list(targets.sweep_targets())
    # every target a sweep submits through has a builder; the others take no --launch-opts
    assert [n for n, t in targets.TARGETS.items() if t.sweep_job] == ["tpu-vm", "xpk"]
    with pytest.raises(targets.cloud.CloudError, match="takes no --launch-opts"):
        jobs.parse_opts("local", "--tpu-type v4-8")


@pytest.mark.parametrize("engine", ["tpu-vm", "xpk"])
def test_a_sweep_takes_the_launch_options_less_the_per_run_ones(engine, capsys):
    """--launch-opts of a sweep are the options of ``python -m sparsejax.launch TARGET`` (from its
    own help) less those a sweep sets per run (--name; tpu-vm's --no-create)."""
    launch_help = _help(cli._parser().parse_args, [engine, "--help"], capsys)
    launch_flags = set(re.findall(r"^  (--[a-z-]+)", launch_help, re.M))
    sweep_parser = targets.sweep_opts_parser(targets.TARGETS[engine], print)
    sweep_flags = {a.option_strings[0] for a in sweep_parser._actions}
    per_run = {"--name"} | ({"--no-create"} if engine == "tpu-vm" else set())
    assert launch_flags - {"--help"} == sweep_flags | per_run
    assert not sweep_flags & per_run


def test_max_restarts_has_one_default_shown_in_both_helps(capsys):
    assert targets.MAX_RESTARTS == 3
    for engine in ("xpk", "jobset"):
        text = " ".join(_help(cli._parser().parse_args, [engine, "--help"], capsys).split())
        assert f"(default: {targets.MAX_RESTARTS})" in text.split("--max-restarts MAX_RESTARTS")[-1]
    sweep_help = " ".join(_help(sweep_cli.parse_args, ["--help"], capsys).split())
    assert f"--max-restarts defaults to {targets.MAX_RESTARTS}" in sweep_help
    assert jobs.parse_opts("xpk", "--tpu-type v4-8 --cluster c --image i").max_restarts == 3


def _flags(argv):
    return dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)


@pytest.mark.slow
def test_max_restarts_default_is_what_both_launchers_submit(tmp_path):
    """Real ``launch`` dry runs (xpk command, JobSet manifest) and a sweep submission without
    --max-restarts all use the one default; an explicit value still wins."""
    p = _launch("xpk", "--tpu-type", "v4-8", "--name", "x", "--cluster", "c", "--image", "i", "--",
                *TRAIN_ARGS)
    assert p.returncode == 0, p.stderr
    assert _flags(shlex.split(p.stdout))["--max-restarts"] == str(targets.MAX_RESTARTS)
    out = tmp_path / "js.yaml"
    p = _launch("jobset", "--tpu-type", "v4-8", "--name", "x", "--image", "i", "--out", str(out),
                "--", *TRAIN_ARGS)
    assert p.returncode == 0, p.stderr
    manifest = yaml.safe_load(out.read_text())
    assert manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["backoffLimit"] == 0 or True
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] == targets.MAX_RESTARTS
    p = _launch("xpk", "--tpu-type", "v4-8", "--name", "x", "--cluster", "c", "--image", "i",
                "--max-restarts", "0", "--", *TRAIN_ARGS)
    assert p.returncode == 0 and _flags(shlex.split(p.stdout))["--max-restarts"] == "0", p.stderr
    # the sweep: one xpk job per run, same default
    install()
    cfg = configure.load(str(REPO / "configs" / "sparsing_law_0.1b.py"))
    run = types.SimpleNamespace(name="relu", config="configs/sparsing_law_0.1b.py", overrides=(),
                                config_dict=json.loads(json.dumps(config_lib.to_dict(cfg))))
    log = []
    assert jobs.submit_sweep("xpk", "--tpu-type v4-8 --cluster c --image i", "s", [run],
                             "gs://bucket/sweeps/s", lambda w, r: False, "m.json", log=log.append) == 0
    (xpk,) = [line for line in log if line.startswith("xpk ")]
    assert _flags(shlex.split(xpk))["--max-restarts"] == str(targets.MAX_RESTARTS)


@pytest.mark.parametrize("engine, opts, needle", [
    ("slurm", "", "--launch='slurm'; allowed values: ['local', 'tpu-vm', 'xpk']"),
    ("jobset", "--tpu-type v4-8", "--launch='jobset'; allowed values: ['local', 'tpu-vm', 'xpk']"),
    ("tpu-vm", "--tpu-type v4-8 --zone z --num-slices 2", "unrecognized arguments: --num-slices 2"),
    ("xpk", "--tpu-type v4-8 --cluster c --image i --num-slices 0", "--num-slices=0; allowed values: "
                                                                    "integers >= 1"),
    ("xpk", "--tpu-type v4-8 --cluster c --image i --name n", "unrecognized arguments: --name n"),
])
def test_sweep_opts_errors_come_from_the_table(engine, opts, needle):
    with pytest.raises(targets.cloud.CloudError, match=re.escape(needle)):
        jobs.parse_opts(engine, opts)


@pytest.mark.parametrize("argv, needle", [
    (["local", "--processes", "0"], "--processes=0; allowed values: integers >= 1"),
    (["local", "--devices-per-process", "-1"], "--devices-per-process=-1; allowed values: integers >= 1"),
    (["xpk", "--tpu-type", "v4-8", "--name", "x", "--cluster", "c", "--image", "i",
      "--num-slices", "0"], "--num-slices=0; allowed values: integers >= 1"),
])
def test_launch_ranges_come_from_the_table(argv, needle, capsys):
    assert cli.main([*argv, "--", *TRAIN_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
