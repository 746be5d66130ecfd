"""sparsejax.kernels.cpu_decode: the C++ row reader of the sparse decode FFN against an independent
numpy computation, its shape and dtype errors, its build cache (real processes building at once),
and what happens without a compiler (auto falls back to XLA's gather; an explicit cpu is one
line, exit 2)."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import decode_ffn
from sparsejax.config import ModelConfig
from sparsejax.kernels import cpu_decode

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _problem(n, d, f, density, seed=0, gated=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    coef = (rng.standard_normal((n, f)) * (rng.random((n, f)) < density)).astype(np.float32)
    up = rng.standard_normal((f, d)).astype(np.float32) if gated else None
    out = rng.standard_normal((f, d)).astype(np.float32)
    return x, coef, up, out


def _numpy(x, coef, up, out):
    c = coef.astype(np.float64)
    if up is not None:
        c = c * (x.astype(np.float64) @ up.astype(np.float64).T)
    return c @ out.astype(np.float64)


@pytest.mark.parametrize("n,d,f,density,gated", [
    (1, 64, 200, 0.1, True),      # 20 rows: one thread
    (1, 96, 1000, 0.3, True),     # ~300 rows: shared with the pool, a ragged last chunk
    (4, 72, 500, 0.25, True),     # union over 4 tokens, each with its own active set
    (3, 40, 300, 0.5, False),     # plain FFN: no up rows
    (2, 33, 130, 1.0, True),      # every neuron active; D not a multiple of the vector lanes
    (2, 16, 50, 0.0, True),       # nothing active: zeros
])
def test_rows_ffn_matches_numpy(n, d, f, density, gated):
    x, coef, up, out = _problem(n, d, f, density, gated=gated)
    y = jax.jit(cpu_decode.rows_ffn)(x, coef, up, out)
    want = _numpy(x, coef, up, out)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))
    if density == 0.0:
        assert not np.asarray(y).any()


def test_rows_ffn_reads_only_active_rows_and_propagates_nan():
    """Rows of inactive neurons are never read: NaN there does not reach the output. A NaN
    coefficient is active (the project's one active rule) and does."""
    x, coef, up, out = _problem(2, 32, 400, 0.2)
    inactive = np.flatnonzero(~(coef != 0).any(axis=0))
    up_nan, out_nan = up.copy(), out.copy()
    up_nan[inactive] = np.nan
    out_nan[inactive] = np.nan
    y = np.asarray(cpu_decode.rows_ffn(x, coef, up_nan, out_nan))
    np.testing.assert_allclose(y, _numpy(x, coef, up, out), rtol=1e-4, atol=1e-3)
    coef_nan = coef.copy()
    coef_nan[1, inactive[0]] = np.nan
    y = np.asarray(cpu_decode.rows_ffn(x, coef_nan, up, out))
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()


def test_rows_ffn_errors():
    x, coef, up, out = _problem(1, 16, 40, 0.5)
    with pytest.raises(TypeError, match="float32"):
        cpu_decode.rows_ffn(x, coef, up.astype(np.float16), out)
    cpu_decode.ensure()
    bad = jax.ffi.ffi_call(cpu_decode.TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))
    with pytest.raises(Exception, match="up must be"):
        bad(x, coef, up[:-1], out).block_until_ready()
    with pytest.raises(Exception, match="shapes must be"):
        bad(x, coef[:, :-1], up, out).block_until_ready()


def test_resolve_kernel():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, head_dim=8, d_ff=96)
    assert decode_ffn.resolve_kernel("auto", cfg) == ("cpu", "")
    assert decode_ffn.resolve_kernel("xla", cfg) == ("xla", "")
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    kernel, why = decode_ffn.resolve_kernel("auto", bf16)
    assert kernel == "xla" and "float32" in why
    with pytest.raises(decode_ffn.KernelError, match="float32"):
        decode_ffn.resolve_kernel("cpu", bf16)
    with pytest.raises(decode_ffn.KernelError, match="allowed"):
        decode_ffn.resolve_kernel("fast", cfg)


# ---------------------------------------------------------------------- build, real processes
PROBE = """
import json, sys
import numpy as np
from sparsejax import decode_ffn
from sparsejax.config import ModelConfig
from sparsejax.kernels import cpu_decode
cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, head_dim=8, d_ff=96)
kernel, why = decode_ffn.resolve_kernel("auto", cfg)
try:
    decode_ffn.resolve_kernel("cpu", cfg)
    refused = ""
except decode_ffn.KernelError as err:
    refused = str(err)
y = None
if kernel == "cpu":
    x = np.ones((1, 8), np.float32); c = np.eye(1, 200, 3, dtype=np.float32) * 2
    w = np.arange(1600, dtype=np.float32).reshape(200, 8)
    y = np.asarray(cpu_decode.rows_ffn(x, c, w, w)).tolist()
print(json.dumps({"kernel": kernel, "why": why, "refused": refused, "y": y}))
"""


def _python(code_or_args, cache, **env):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc):
    import json

    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_concurrent_builds_share_one_cached_library(tmp_path):
    """Two processes building into an empty cache at once both load a working kernel; one
    library is left, no temporary file; a later process reuses it without building."""
    procs = [_python(PROBE, tmp_path) for _ in range(2)]
    results = [_result(p) for p in procs]
    want = (2 * np.arange(24, 32, dtype=np.float64).sum() * np.arange(24, 32)).tolist()
    for r in results:
        assert r["kernel"] == "cpu" and r["refused"] == "" and r["y"] == [want]
    built = list((tmp_path / "sparsejax" / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so", built
    mtime = built[0].stat().st_mtime_ns
    assert _result(_python(PROBE, tmp_path))["kernel"] == "cpu"
    assert built[0].stat().st_mtime_ns == mtime


@pytest.mark.slow
@pytest.mark.parametrize("cxx,message", [("/nonexistent/g++", "no C++ compiler"),
                                         ("false", "failed to build")])
def test_without_a_working_compiler_auto_uses_xla(tmp_path, cxx, message):
    r = _result(_python(PROBE, tmp_path, CXX=cxx))
    assert r["kernel"] == "xla" and message in r["why"] and message in r["refused"]
    assert not list((tmp_path / "sparsejax" / "kernels").glob("*")), "nothing left behind"


@pytest.mark.slow
def test_a_failed_build_is_not_retried(tmp_path):
    """A compiler that fails is run once per process (its version, then the build), however many
    times the kernel is asked for."""
    calls = tmp_path / "calls"
    cxx = tmp_path / "cxx"
    cxx.write_text(f"#!/bin/sh\necho \"$1\" >> {calls}\nexit 1\n")
    cxx.chmod(0o755)
    r = _result(_python(PROBE, tmp_path / "cache", CXX=str(cxx)))  # asks twice: auto, then cpu
    assert r["kernel"] == "xla" and "failed to build" in r["refused"]
    assert calls.read_text().splitlines() == ["--version", "-O3"]


@pytest.mark.slow
def test_generate_without_compiler(tmp_path):
    """generate: --decode-kernel cpu without a compiler is one line, exit 2; auto decodes with
    XLA's gather (same tokens as dense) and says why."""
    hf = ROOT / "tests" / "fixtures" / "hf" / "minicpm"
    args = ["-m", "sparsejax.generate", "--hf", str(hf), "--prompt", "Hello",
            "--max-new-tokens", "6", "--ffn", "sparse"]
    env = {"CXX": "/nonexistent/g++"}
    refused = _python([*args, "--decode-kernel", "cpu"], tmp_path, **env)
    out, err = refused.communicate(timeout=300)
    assert refused.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("generate error: decode kernel 'cpu' cannot "
                                                   "run here: no C++ compiler"), err
    auto = _python(args, tmp_path, **env)
    dense = _python(args[:-2], tmp_path)
    out_auto, err_auto = auto.communicate(timeout=300)
    out_dense, err_dense = dense.communicate(timeout=300)
    assert auto.returncode == 0 and dense.returncode == 0, (err_auto, err_dense)
    assert "decode kernel 'cpu' not used: no C++ compiler" in err_auto and "kernel xla" in err_auto
    assert out_auto == out_dense
