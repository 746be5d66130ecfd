"""Cloud launch commands and manifests (dry runs), and sweep runs as jobs.

The expected host counts come from Cloud TPU's published slice shapes, written out by hand
below, not from the code under test.
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys
import types

import pytest
import yaml

from fake_gcs import install
from sparsejax import config as config_lib
from sparsejax import configure
from sparsejax.launch import cli, cloud, jobs

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("sparsing_law_*.py"))
# accelerator type -> (chips, hosts, chips per host), from the Cloud TPU docs' slice tables
SLICES = {
    "v5e-8": (8, 1, 8), "v5litepod-16": (16, 4, 4), "v5e-256": (256, 64, 4),
    "v4-8": (4, 1, 4), "v4-128": (64, 16, 4), "v5p-128": (64, 16, 4), "v5p-1024": (512, 128, 4),
    "v6e-64": (64, 16, 4), "v6e-4": (4, 1, 4),
}
TOPOLOGY = {"v5e-8": "2x4", "v5litepod-16": "4x4", "v5e-256": "16x16", "v4-8": "2x2x1",
            "v4-128": "4x4x4", "v5p-128": "4x4x4", "v5p-1024": "8x8x8", "v6e-64": "8x8", "v6e-4": "2x2"}


def _train_args(config, workdir="gs://bucket/runs/r"):
    return ["--config", f"configs/{config}", "--workdir", workdir, "--set", "mesh.fsdp=-1",
            "--set", "mesh.data=1"]


@pytest.mark.parametrize("tpu", sorted(SLICES))
def test_slice_table(tpu):
    sl = cloud.parse_slice(tpu)
    assert (sl.chips, sl.hosts, sl.chips_per_host) == SLICES[tpu]
    assert sl.topology == TOPOLOGY[tpu]


@pytest.mark.parametrize("config", PAPER_CONFIGS)
@pytest.mark.parametrize("tpu", ["v5e-256", "v4-128", "v5litepod-16", "v5e-8"])
def test_commands_and_manifest_for_paper_configs(config, tpu):
    chips, hosts, per_host = SLICES[tpu]
    args = _train_args(config)
    cfg = configure.load(str(REPO / "configs" / config), ["mesh.fsdp=-1", "mesh.data=1"])
    cloud.check_batch(cloud.parse_slice(tpu), 1, cfg.train.batch_size)
    sl = cloud.parse_slice(tpu)
    multi = ["--distributed", "on"] if hosts > 1 else []

    # TPU VM: create with the accelerator type, then every step on --worker=all, same train args
    steps = cloud.tpu_vm_steps(sl, cloud.TpuVm("sj", "us-west4-a"), args)
    create = steps[0][1]
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert f"--accelerator-type={sl.accelerator_type}" in create
    ssh = [argv for _, argv in steps if "ssh" in argv]
    assert len(ssh) == 2 and all("--worker=all" in argv for argv in ssh)
    install_cmd = ssh[0][-1]
    assert "-r requirements.txt" in install_cmd and "jax[tpu]==" in install_cmd
    train = shlex.split(ssh[1][-1].split("&& ", 1)[1])
    assert train == ["python3", "train.py", *args, *multi]

    # xpk: the slice type and the same command; xpk fans it out to every host
    xpk = cloud.xpk_command(sl, args, workload="sj-run", cluster="c", image="img", num_slices=2,
                            max_restarts=3)
    flags = dict(a.split("=", 1) for a in xpk[3:])
    assert xpk[:3] == ["xpk", "workload", "create"]
    assert flags["--tpu-type"] == sl.accelerator_type and flags["--num-slices"] == "2"
    assert shlex.split(flags["--command"]) == ["python3", "train.py", *args, "--distributed", "on"]

    # JobSet: one pod per host, each asking for the host's chips, same command everywhere
    for slices in (1, 2):
        m = yaml.safe_load(cloud.to_yaml(cloud.jobset_manifest(sl, args, name="sj", image="img",
                                                                 num_slices=slices, max_restarts=3)))
        assert m["kind"] == "JobSet"
        (job,) = m["spec"]["replicatedJobs"]
        assert job["replicas"] == slices
        spec = job["template"]["spec"]
        assert spec["parallelism"] == spec["completions"] == hosts
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["google.com/tpu"] == per_host
        topo = pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
        dims = [int(d) for d in topo.split("x")]
        assert dims[0] * dims[1] * (dims[2] if len(dims) == 3 else 1) == chips
        cmd = shlex.split(container["command"][2].split("&& ", 1)[1])
        assert cmd == ["python3", "train.py", *args, *(["--distributed", "on"] if hosts * slices > 1 else [])]
        env = {e["name"] for e in container["env"]}
        assert ("MEGASCALE_NUM_SLICES" in env) == (slices > 1)


def _cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "sparsejax.launch", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow
def test_cli_dry_runs_end_to_end(tmp_path):
    args = _train_args("sparsing_law_0.1b.py")
    p = _cli("tpu-vm", "--tpu-type", "v5e-16", "--name", "sj-01b", "--zone", "us-west4-a", "--", *args)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("#!/usr/bin/env bash") and p.stdout.count("--worker=all") == 3
    assert "4 host(s) × 4 chips" in p.stderr
    p = _cli("xpk", "--tpu-type", "v5e-256", "--name", "sj-01b", "--cluster", "c", "--image", "img", "--", *args)
    assert p.returncode == 0 and p.stdout.startswith("xpk workload create"), p.stderr
    out = tmp_path / "jobset.yaml"
    p = _cli("jobset", "--tpu-type", "v4-128", "--name", "sj", "--image", "img", "--out", str(out), "--", *args)
    assert p.returncode == 0, p.stderr
    assert yaml.safe_load(out.read_text())["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == 16


@pytest.mark.parametrize("argv, needle", [
    (["tpu-vm", "--tpu-type", "v5e-100", "--name", "x", "--zone", "z"], "--tpu-type='v5e-100': size 100 is not a v5litepod slice"),
    (["tpu-vm", "--tpu-type", "v9-8", "--name", "x", "--zone", "z"], "generation 'v9' unknown"),
    (["xpk", "--tpu-type", "v5p-2048", "--name", "x", "--cluster", "c", "--image", "i"],
     "train.batch_size=512 is not divisible by the 1024 chips"),
    (["jobset", "--tpu-type", "v4-8", "--name", "Bad_Name", "--image", "i"], "--name='Bad_Name' must be"),
    (["jobset", "--tpu-type", "v4-8", "--name", "x", "--image", "i", "--num-slices", "0"], "--num-slices=0"),
    (["jobset", "--tpu-type", "v4-8", "--name", "x", "--image", "i", "--max-restarts", "-3"],
     "--max-restarts=-3; allowed values: integers >= 0"),
    (["xpk", "--tpu-type", "v4-8", "--name", "x", "--cluster", "c", "--image", "i", "--max-restarts", "-1"],
     "--max-restarts=-1"),
    (["jobset", "--tpu-type", "v4-8", "--name", "x", "--image", "i", "--out", "{tmp}/missing/m.yaml"],
     "directory {tmp}/missing does not exist"),
    (["jobset", "--tpu-type", "v4-8", "--name", "x", "--image", "i", "--out", "{tmp}"], "is a directory"),
    (["tpu-vm", "--tpu-type", "v4-32", "--name", "x", "--zone", "z", "--workdir", "runs/localdir"],
     "--workdir='runs/localdir' must be a gs:// URL for 1 × v4-32 (4 hosts)"),
    (["jobset", "--tpu-type", "v4-32", "--name", "x", "--image", "i", "--workdir", "runs/localdir"],
     "must be a gs:// URL"),
    (["xpk", "--tpu-type", "v4-8", "--name", "x", "--cluster", "c", "--image", "i", "--num-slices", "2",
      "--workdir", "runs/localdir"], "must be a gs:// URL for 2 × v4-8 (2 hosts)"),
])
def test_cli_bad_input_is_one_line(argv, needle, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    needle = needle.replace("{tmp}", str(tmp_path))
    workdir = "gs://bucket/runs/r"
    if "--workdir" in argv:
        i = argv.index("--workdir")
        workdir, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    before = sorted(tmp_path.rglob("*"))
    assert cli.main([*argv, "--", *_train_args("sparsing_law_0.1b.py", workdir)]) == 2
    assert sorted(tmp_path.rglob("*")) == before
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err
    assert captured.out == ""


def test_cli_bad_config_and_missing_workdir(capsys):
    assert cli.main(["xpk", "--tpu-type", "v4-8", "--name", "x", "--cluster", "c", "--image", "i", "--",
                     "--config", "configs/sparsing_law_0.1b.py"]) == 2
    assert "must include --config and --workdir" in capsys.readouterr().err
    assert cli.main(["xpk", "--tpu-type", "v4-8", "--name", "x", "--cluster", "c", "--image", "i", "--",
                     *_train_args("sparsing_law_0.1b.py"), "--set", "model.activation=reluu"]) == 2
    assert "model.activation='reluu'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_run_without_the_tool_runs_nothing(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # no gcloud, no xpk
    p = _cli("tpu-vm", "--tpu-type", "v4-8", "--name", "x", "--zone", "z", "--run", "--",
             *_train_args("sparsing_law_0.1b.py"), env=env)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == \
        "error: gcloud is not on PATH; install it, or omit --run to print the commands"
    assert p.stdout == ""


# ------------------------------------------------------------------------ sweeps as cloud jobs
def _runs():
    out = []
    for name, act in (("relu", "relu"), ("silu", "silu")):
        overrides = (f"name={name}", f"model.activation={act}")
        cfg = configure.load(str(REPO / "configs/sparsing_law_0.1b.py"), list(overrides))
        out.append(types.SimpleNamespace(name=name, config="configs/sparsing_law_0.1b.py", overrides=overrides,
                                         config_dict=json.loads(json.dumps(config_lib.to_dict(cfg)))))
    return out


def _done(workdir, run):  # the sweep's check: the marker holds this run's config
    try:
        return json.loads((workdir / "marker.json").read_text())["config"] == run.config_dict
    except (OSError, FileNotFoundError, ValueError):
        return False


@pytest.mark.parametrize("engine, opts", [
    ("xpk", "--tpu-type v5e-256 --cluster c --image img --run"),
    ("tpu-vm", "--tpu-type v5e-16 --zone us-west4-a --run"),
])
def test_sweep_submits_one_job_per_unfinished_run(engine, opts, monkeypatch):
    install()
    monkeypatch.setattr("shutil.which", lambda tool: f"/usr/bin/{tool}")
    runs, executed, log = _runs(), [], []
    out = "gs://bucket/sweeps/s"
    ex = lambda argv: executed.append(argv) or 0  # noqa: E731
    assert jobs.submit_sweep(engine, opts, "scale", runs, out, _done, "marker.json",
                             execute=ex, log=log.append) == 0
    per_run = len(executed) // 2
    assert per_run >= 1 and len(executed) == 2 * per_run
    if engine == "xpk":
        assert [a[3] for a in executed] == ["--workload=scale-relu", "--workload=scale-silu"]
        command = shlex.split(dict(a.split("=", 1) for a in executed[0][3:])["--command"])
        assert command[:9] == ["python3", "-m", "sparsejax.launch", "job", "--run-name", "relu",
                               "--marker", "marker.json", "--"]
        assert command[9:13] == ["--config", "configs/sparsing_law_0.1b.py", "--workdir",
                                 "gs://bucket/sweeps/s/runs/relu"]
    else:
        assert "scale-relu" in executed[0][-1] and "--accelerator-type=v5litepod-16" in executed[0][-1]
        assert "pgrep" in executed[per_run - 1][-1]  # not started twice on the same workers
    # relu finished (its job wrote the marker): only silu is submitted again
    from sparsejax import rundir, storage

    rundir.atomic_write(storage.path(out) / "runs/relu/marker.json", json.dumps({"config": runs[0].config_dict}))
    executed.clear()
    assert jobs.submit_sweep(engine, opts, "scale", runs, out, _done, "marker.json", execute=ex,
                             log=log.append) == 0
    assert len(executed) == per_run and "relu: trained" in "\n".join(log)
    # a failing submission is reported, the next run still goes
    assert jobs.submit_sweep(engine, opts, "scale", runs, out, lambda w, r: False, "marker.json",
                             execute=lambda argv: 1, log=log.append) == 1


@pytest.mark.parametrize("engine, opts, needle", [
    ("slurm", "", "--launch='slurm'; allowed values"),
    ("xpk", "--tpu-type v5e-256", "the following arguments are required: --cluster, --image"),
    ("xpk", "--tpu-type v5e-257 --cluster c --image i", "size 257 is not a v5litepod slice"),
    ("tpu-vm", '--tpu-type "unterminated', "No closing quotation"),
    ("xpk", "--tpu-type v5e-256 --cluster c --image i --max-restarts -2", "--max-restarts=-2"),
])
def test_sweep_launch_bad_input(engine, opts, needle):
    with pytest.raises(cloud.CloudError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        jobs.submit_sweep(engine, opts, "s", _runs(), "gs://b/o", _done, "m.json", execute=None)


def test_sweep_launch_needs_a_bucket():
    with pytest.raises(cloud.CloudError, match="must be a gs:// URL"):
        jobs.submit_sweep("xpk", "--tpu-type v4-8 --cluster c --image i", "s", _runs(), "runs/out",
                          _done, "m.json")


def test_sweep_launch_without_a_gs_backend_is_one_line(monkeypatch):
    from etils.epath import backend

    class NoGcsfs:
        def __init__(self, *a, **k):
            raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, "gcs", NoGcsfs)
    backend.fsspec_backend._get_filesystem.cache_clear()
    log = []
    with pytest.raises(cloud.CloudError, match="cannot read --out=gs://b/o .*pip install gcsfs"):
        jobs.submit_sweep("xpk", "--tpu-type v4-8 --cluster c --image i", "s", _runs(), "gs://b/o",
                          _done, "m.json", log=log.append)
    assert log == []
    backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.mark.slow
def test_sweep_cli_hook(tmp_path):
    """python -m sparsejax.sweep SPEC --launch xpk: bad engine options and a local --out are
    one-line errors (exit 2), nothing written."""
    base = [sys.executable, "-m", "sparsejax.sweep", "configs/sweeps/sparsing_law_scale.py"]
    p = subprocess.run(base + ["--out", str(tmp_path / "o"), "--launch", "xpk", "--launch-opts",
                               "--tpu-type v5e-256 --cluster c --image i"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"sweep error: --out={str(tmp_path / 'o')!r} must be a gs:// URL for --launch xpk: every "
        f"host writes there and the sweep reads the markers from there"]
    p = subprocess.run(base + ["--out", "gs://b/o", "--launch", "tpu-vm", "--launch-opts", "--tpu-type v5e-16"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "the following arguments are required: --zone" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_job_names():
    assert jobs.job_name("sparsing_law_scale", "0.1b_relu") == "sparsing-law-scale-0-1b-relu"
    long = jobs.job_name("a" * 30, "b" * 30)
    assert len(long) <= 40 and long != jobs.job_name("a" * 30, "b" * 29 + "c")
    assert jobs.job_name("1x", "y")[0].isalpha()


@pytest.mark.slow
def test_job_writes_the_marker_on_host_zero_only(tmp_path):
    """The job wrapper around a real 2-step train.py: marker = the config train.py wrote."""
    overrides = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.head_dim=32",
                 "model.d_ff=160", "train.batch_size=8", "train.seq_len=32", "train.steps=2",
                 "train.eval_batches=1", "name=r"]
    args = ["--config", str(REPO / "configs/tiny_relu.py"), "--workdir", str(tmp_path / "w"), "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    p = subprocess.run([sys.executable, "-m", "sparsejax.launch", "job", "--run-name", "r", "--marker",
                        "done.json", "--", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr
    marker = json.loads((tmp_path / "w" / "done.json").read_text())
    cfg = configure.load(str(REPO / "configs/tiny_relu.py"), overrides)
    assert marker["run"] == "r" and marker["config"] == json.loads(json.dumps(config_lib.to_dict(cfg)))
    assert jobs.host_index({"TPU_WORKER_ID": "3"}) == 3 and jobs.host_index({}) == 0
    assert jobs.host_index({"TPU_WORKER_ID": "0", "MEGASCALE_SLICE_ID": "1"}) == 1
