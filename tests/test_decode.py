"""Generation with a KV cache (sparsejax.decode) against the full forward pass, the sparse decode
FFN (sparsejax.decode_ffn) against the dense one, and the generate CLI's input errors."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import golden_run

from sparsejax import decode, model as model_lib
from sparsejax.config import ModelConfig
from sparsejax.sparsity import Sparsity

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = [np.array([3, 1, 4, 1, 5, 9, 2]), np.array([6, 5]), np.array([3, 5, 8, 9])]


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, head_dim=8, d_ff=96,
                max_seq_len=64, init_std=0.3)
    return ModelConfig(**{**base, **kw})


MODELS = {
    "mha": _cfg(),
    "scan_gqa_linear_rope": _cfg(scan_layers=True, n_kv_heads=2, rope_type="linear",
                                 rope_factor=2.0),
    "gqa_llama3_rope": _cfg(n_kv_heads=1, rope_type="llama3", rope_factor=8.0,
                            rope_original_max_len=16),
    "minicpm_scan": _cfg(scan_layers=True, scale_emb=3.0, scale_depth=1.4, dim_model_base=16,
                         tie_embeddings=False, n_kv_heads=2),
}


def _model(cfg, seed=0):
    m = model_lib.Model(cfg)
    return m, m.init(jax.random.key(seed), 16)


def _full_logits(m, params, rows, sp=None):
    """The full forward pass's logits of each row (right-padded into one batch: causal attention
    keeps the padding out of every real position)."""
    length = max(len(r) for r in rows)
    batch = np.zeros((len(rows), length), np.int32)
    for b, r in enumerate(rows):
        batch[b, :len(r)] = r
    logits = np.asarray(jax.jit(lambda p, t: m.apply(p, t, sparsity=sp)[0])(params, batch))
    return [logits[b, :len(r)] for b, r in enumerate(rows)]


@pytest.mark.parametrize("name", [n if n == "scan_gqa_linear_rope" else
                                  pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_greedy_equals_full_forward_argmax(name):
    """Every generated token is the argmax of the full forward pass over prompt + generated
    tokens, for each row of a left-padded batch; the cached logits match the full ones."""
    cfg = MODELS[name]
    m, params = _model(cfg)
    dec = decode.Decoder(cfg, params)
    out = dec.generate(PROMPTS, 10)
    assert out.decode_steps == 9
    generated = np.array(out.tokens)
    fulls = _full_logits(m, params, [np.concatenate([p, r]) for p, r in zip(PROMPTS, generated)])
    for prompt, row, full in zip(PROMPTS, generated, fulls):
        want = np.argmax(full[len(prompt) - 1:-1], axis=-1)
        np.testing.assert_array_equal(row, want)
    assert len({tuple(r) for r in generated}) > 1  # not a degenerate model
    # The cached passes' logits, token by token, against the full pass (float rounding only).
    logits, _ = dec.teacher_forced(PROMPTS, generated)
    for b, (prompt, full) in enumerate(zip(PROMPTS, fulls)):
        np.testing.assert_allclose(logits[b], full[len(prompt):], rtol=2e-4, atol=2e-4)


def test_chunked_steps_equal_single_steps():
    """Verifying k tokens per step (a BlockFFN-style chunk) gives the single steps' logits."""
    cfg = MODELS["scan_gqa_linear_rope"]
    m, params = _model(cfg)
    dec = decode.Decoder(cfg, params)
    cont = np.random.default_rng(0).integers(0, 64, (3, 8)).astype(np.int32)
    one, _ = dec.teacher_forced(PROMPTS, cont)
    four, _ = dec.teacher_forced(PROMPTS, cont, tokens_per_step=4)
    np.testing.assert_allclose(four, one, rtol=2e-4, atol=2e-4)


def test_sampling_reproducible_from_seed():
    cfg = MODELS["mha"]
    _, params = _model(cfg)
    dec = decode.Decoder(cfg, params)
    kw = dict(temperature=1.5, top_p=0.95)
    a = dec.generate(PROMPTS, 12, seed=7, **kw).tokens
    assert dec.generate(PROMPTS, 12, seed=7, **kw).tokens == a
    assert dec.generate(PROMPTS, 12, seed=8, **kw).tokens != a
    greedy = dec.generate(PROMPTS, 12).tokens
    assert a != greedy
    # A nucleus smaller than the top token's probability keeps the top token only: greedy.
    assert dec.generate(PROMPTS, 12, seed=7, temperature=1.0, top_p=1e-6).tokens == greedy


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(decode.sample_logits(logits, jax.random.key(i), 1.0, 0.75)[0]) for i in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are outside
    draws = {int(decode.sample_logits(logits, jax.random.key(i), 1.0, 1.0)[0]) for i in range(400)}
    assert draws == {0, 1, 2, 3}


def test_bad_generation_input():
    dec = decode.Decoder(MODELS["mha"], _model(MODELS["mha"])[1])
    with pytest.raises(decode.DecodeError, match="max_seq_len=64"):
        dec.generate([np.arange(60) % 64], 10)
    with pytest.raises(decode.DecodeError, match="at least one token"):
        dec.generate([np.array([], np.int32)], 3)
    with pytest.raises(decode.DecodeError, match="top-p"):
        dec.generate(PROMPTS, 3, temperature=1.0, top_p=0.0)


# ----------------------------------------------------------------------------- sparse decode
def _sparse_vs_dense(cfg, sp, capacity, steps=12, prompts=PROMPTS, kernel="xla",
                     tokens_per_step=1):
    m, params = _model(cfg, seed=1)
    dec = decode.Decoder(cfg, params, sp)
    dense = dec.generate(prompts, steps)
    cont = np.array(dense.tokens)
    dense_logits, _ = dec.teacher_forced(prompts, cont, tokens_per_step=tokens_per_step)
    sparse_logits, stats = dec.teacher_forced(prompts, cont, ffn="sparse", capacity=capacity,
                                              kernel=kernel, tokens_per_step=tokens_per_step)
    per_step = [decode.step_stats(s, cfg.n_layers) for s in stats]
    active = np.array([a for a, _ in per_step])
    fallback = np.array([f for _, f in per_step])
    sparse = dec.generate(prompts, steps, ffn="sparse", capacity=capacity, kernel=kernel)
    return dense, sparse, dense_logits, sparse_logits, active, fallback


@pytest.mark.parametrize("name,cfg,sp", [
    ("relu_gated", _cfg(), Sparsity()),
    pytest.param("relu2_plain_scan", _cfg(ffn_type="plain", activation="relu2", scan_layers=True),
                 Sparsity(), marks=pytest.mark.slow),
    pytest.param("fatrelu_scan_gated", _cfg(activation="fatrelu", scan_layers=True),
                 Sparsity(threshold=0.5),
                 marks=pytest.mark.slow),
    pytest.param("trained_topk_gqa", _cfg(activation="silu", n_kv_heads=2), Sparsity(topk_k=12),
                 marks=pytest.mark.slow),
])
def test_sparse_decode_equals_dense_with_fallback(name, cfg, sp):
    """With a capacity between the smallest and largest active count, some steps gather and some
    fall back to dense; every step's logits equal dense decoding's to float rounding, and
    generation picks the same tokens. Batch 1: the union is one token's active set."""
    prompts = PROMPTS[:1]
    m, params = _model(cfg, seed=1)
    dec = decode.Decoder(cfg, params, sp)
    probe, stats = dec.teacher_forced(prompts, np.zeros((1, 12), np.int32), ffn="sparse",
                                      capacity=cfg.d_ff, kernel="xla")
    counts = np.array([decode.step_stats(s, cfg.n_layers)[0] for s in stats])
    assert 0 < counts.min() and counts.max() < cfg.d_ff
    capacity = int(np.median(counts)) if counts.min() < counts.max() else int(counts.max())
    dense, sparse, dl, sl, active, fallback = _sparse_vs_dense(cfg, sp, capacity, prompts=prompts)
    np.testing.assert_allclose(sl, dl, rtol=1e-4, atol=1e-4)
    assert sparse.tokens == dense.tokens
    np.testing.assert_array_equal(fallback, active > capacity)
    if sp.topk_k:  # a trained top-k activates exactly k per token: capacity k never falls back
        assert (active == sp.topk_k).all() and not fallback.any()
    else:
        assert fallback.any() and not fallback.all()


@pytest.mark.parametrize("name,cfg,sp,batch,k", [
    ("relu_gated_batch3_chunk2", _cfg(), Sparsity(), 3, 2),
    ("relu2_plain_scan", _cfg(ffn_type="plain", activation="relu2", scan_layers=True),
     Sparsity(), 1, 1),
    pytest.param("fatrelu_scan_gated_batch3", _cfg(activation="fatrelu", scan_layers=True),
                 Sparsity(threshold=0.5), 3, 1, marks=pytest.mark.slow),
    pytest.param("trained_topk_gqa_chunk4", _cfg(activation="silu", n_kv_heads=2),
                 Sparsity(topk_k=12), 1, 4, marks=pytest.mark.slow),
    pytest.param("silu_thresholded", _cfg(activation="silu"),
                 Sparsity(thresholds=decode.fat_thresholds(_cfg(activation="silu"), 0.3),
                          mask_target="activation"), 3, 1, marks=pytest.mark.slow),
])
def test_cpu_kernel_sparse_decode_equals_dense(name, cfg, sp, batch, k):
    """The C++ row reader (``kernel="cpu"``) has no capacity: every step reads exactly its union
    of active rows, never falls back, and its logits and tokens equal dense decoding's (to float
    rounding), for gated and plain FFNs, scanned layers, batch rows and k-token steps."""
    prompts = PROMPTS[:batch]
    dense, sparse, dl, sl, active, fallback = _sparse_vs_dense(
        cfg, sp, 0, steps=12, prompts=prompts, kernel="cpu", tokens_per_step=k)
    np.testing.assert_allclose(sl, dl, rtol=1e-4, atol=1e-4)
    assert sparse.tokens == dense.tokens
    assert not fallback.any() and 0 < active.min() and active.max() < cfg.d_ff


def test_per_layer_capacity():
    """A capacity per layer: layer 0 never falls back, layer 1 (capacity 1) always does; the
    logits still equal dense decoding's."""
    cfg = _cfg()
    m, params = _model(cfg, seed=1)
    dec = decode.Decoder(cfg, params)
    cont = np.array(dec.generate(PROMPTS[:1], 6).tokens)
    dense, _ = dec.teacher_forced(PROMPTS[:1], cont)
    sparse, stats = dec.teacher_forced(PROMPTS[:1], cont, ffn="sparse", capacity=(cfg.d_ff, 1),
                                       kernel="xla")
    np.testing.assert_allclose(sparse, dense, rtol=1e-4, atol=1e-4)
    fallback = np.array([decode.step_stats(s, cfg.n_layers)[1] for s in stats])
    assert (fallback[:, 0] == 0).all() and (fallback[:, 1] == 1).all()
    assert decode.capacity_for((3, 50), 4, cfg.d_ff) == (12, cfg.d_ff)


def test_layer_fallback_alone_and_step_fallback_flags():
    """The FFN alone, above its capacity: with the per-layer branch it equals the dense FFN; with
    ``step_fallback`` it returns the clipped gather (different) and flags the overflow that the
    Decoder's step-level rerun acts on (exactness of that rerun: test_per_layer_capacity)."""
    from sparsejax import decode_ffn

    cfg = _cfg()
    m, params = _model(cfg, seed=1)
    ffn_p = decode_ffn.with_row_layout(model_lib.Model.unbox(params), cfg)["layer_0"]["ffn"]
    x = jax.random.normal(jax.random.key(3), (2, 1, cfg.d_model))
    ff = model_lib.FeedForward(cfg)
    dense = ff.apply({"params": ffn_p}, x, Sparsity())
    dec = lambda fb: model_lib.Decode(index=jnp.int32(0), start_B=jnp.zeros(2, jnp.int32),  # noqa
                                      cache_len=4, ffn="sparse", capacity=2, step_fallback=fb)
    alone, st = ff.apply({"params": ffn_p}, x, Sparsity(), dec(False), mutable=["stats"])
    clipped, st2 = ff.apply({"params": ffn_p}, x, Sparsity(), dec(True), mutable=["stats"])
    active = int(st["stats"]["decode_active"][0])
    assert active > 2  # the case under test: more active neurons than the capacity
    np.testing.assert_allclose(alone, dense, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(clipped) - np.asarray(dense)).max() > 1e-3
    assert float(st["stats"]["decode_fallback"][0]) == 1 == float(st2["stats"]["decode_fallback"][0])
    assert bool(decode.overflowed(st2["stats"])) and not bool(decode.overflowed({}))


@pytest.mark.slow
def test_sparse_decode_batch_union_and_independent_active_count():
    """The step's active count is the union over the batch rows, counted independently here from
    the full forward pass's σ(gate) at the same positions."""
    cfg = _cfg()
    m, params = _model(cfg, seed=1)
    dec = decode.Decoder(cfg, params)
    cont = np.array(dec.generate(PROMPTS, 4).tokens)
    _, stats = dec.teacher_forced(PROMPTS, cont, ffn="sparse", capacity=cfg.d_ff)
    acts_per_row = []
    for prompt, row in zip(PROMPTS, cont):
        seq = np.concatenate([prompt, row])[None].astype(np.int32)
        _, state = jax.jit(lambda p, t: m.apply(p, t, collect=("intermediates",)))(params, seq)
        acts_per_row.append([np.asarray(a)[0, len(prompt):] for a in m.ffn_intermediates(state)[0]])
    for i, s in enumerate(stats):
        active, fallback = decode.step_stats(s, cfg.n_layers)
        union = np.zeros((cfg.n_layers, cfg.d_ff), bool)
        for acts in acts_per_row:
            for layer in range(cfg.n_layers):
                union[layer] |= acts[layer][i] != 0
        np.testing.assert_array_equal(active, union.sum(axis=1))
        assert not fallback.any()


def test_exact_zeros_includes_a_trained_topk():
    """A top-k (static or scheduled) zeroes the neurons it drops whatever σ is, so SiLU + top-k
    decodes sparse without a threshold; SiLU alone needs one."""
    from sparsejax import decode_ffn

    silu, relu = _cfg(activation="silu"), _cfg()
    assert decode_ffn.exact_zeros(relu, Sparsity())
    assert not decode_ffn.exact_zeros(silu, Sparsity())
    assert decode_ffn.exact_zeros(silu, Sparsity(topk_k=8))
    assert decode_ffn.exact_zeros(silu, Sparsity(coefficients={"topk_k": jnp.int32(8)}))


def test_sparse_decode_refuses_drelu():
    """dReLU applies σ to both projections: σ(gate) alone cannot decide which neurons are zero.
    The FFN refuses it when traced; generate says so in one line (InputError: exit 2)."""
    import types

    from sparsejax import decode_ffn, generate

    cfg = _cfg(activation="drelu")
    assert "applies σ to both" in decode_ffn.unsupported(cfg) and not decode_ffn.unsupported(_cfg())
    m, params = _model(cfg)
    dec = decode.Decoder(cfg, params)
    with pytest.raises(ValueError, match="applies σ to both"):
        dec.teacher_forced(PROMPTS[:1], np.zeros((1, 2), np.int32), ffn="sparse", capacity=8,
                           kernel="xla")
    loaded = generate.Loaded(types.SimpleNamespace(model=cfg), params, Sparsity(), None)
    with pytest.raises(generate.InputError, match="--ffn sparse: model.activation='drelu'"):
        generate.sparse_setup(loaded, types.SimpleNamespace(threshold=None, capacity=0), 1, "cpu")


def test_thresholded_sparse_decode_and_loss_change():
    """SiLU has no zeros: a FAT-ε threshold drops neurons. Sparse decode equals the dense model
    with the same threshold mask; the loss change against the unmasked model is reported."""
    cfg = _cfg(activation="silu")
    m, params = _model(cfg, seed=2)
    thresholds = decode.fat_thresholds(cfg, 0.3)
    sp = Sparsity(thresholds=thresholds, mask_target="activation")
    dec = decode.Decoder(cfg, params, sp)
    cont = np.array(dec.generate(PROMPTS, 6).tokens)
    dl, _ = dec.teacher_forced(PROMPTS, cont)
    sl, stats = dec.teacher_forced(PROMPTS, cont, ffn="sparse", capacity=cfg.d_ff)
    np.testing.assert_allclose(sl, dl, rtol=1e-4, atol=1e-4)
    active = np.array([decode.step_stats(s, cfg.n_layers)[0] for s in stats])
    assert active.max() < cfg.d_ff
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, 64, (2, 17)).astype(np.int32)
    batches = [{"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}]
    dense_loss, sparse_loss = decode.loss_change(m, params, batches, Sparsity(), thresholds)
    logits = m.apply(params, jnp.asarray(seqs[:, :-1]))[0]
    masked = m.apply(params, jnp.asarray(seqs[:, :-1]), sparsity=sp)[0]
    nll = lambda lg: float(-np.mean(np.take_along_axis(  # noqa: E731
        np.asarray(jax.nn.log_softmax(lg)), seqs[:, 1:, None], -1)))
    assert dense_loss == pytest.approx(nll(logits), rel=1e-5)
    assert sparse_loss == pytest.approx(nll(masked), rel=1e-5)
    assert sparse_loss != dense_loss


def test_calibrated_capacity_is_the_largest_token_count():
    cfg = _cfg()
    m, params = _model(cfg, seed=1)
    seqs = np.random.default_rng(1).integers(0, 64, (2, 17)).astype(np.int32)
    batches = [{"inputs": seqs[:1, :-1]}, {"inputs": seqs[1:, :-1]}]
    cap = decode.calibrate(m, params, batches, Sparsity())
    _, state = m.apply(params, jnp.asarray(seqs[:, :-1]), collect=("intermediates",))
    acts, _ = m.ffn_intermediates(state)
    want = [int((np.asarray(a) != 0).sum(-1).max()) for a in acts]
    assert cap.tolist() == want


def test_training_graph_unchanged_without_cache():
    """The training forward pass traces no cache or decode-FFN operations."""
    cfg = MODELS["scan_gqa_linear_rope"]
    m, params = _model(cfg)
    text = jax.jit(lambda p, t: m.apply(p, t)[0]).lower(
        params, jnp.zeros((2, 16), jnp.int32)).as_text()
    assert "dynamic_update_slice" not in text and "top_k" not in text
    assert "cache" not in m.init_annotated(jax.random.key(0), 16)


# ---------------------------------------------------------------------------------------- CLI
def _cli(*args, timeout=180):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "sparsejax.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _snapshot(path: pathlib.Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory):
    return golden_run.build_run(tmp_path_factory.mktemp("gen") / "run")


@pytest.mark.slow
def test_cli_generates_read_only(relu_run):
    before = _snapshot(relu_run)
    r = _cli("--workdir", str(relu_run), "--prompt", "The ", "--prompt", "In the year",
             "--max-new-tokens", "12", "--ffn", "sparse")
    assert r.returncode == 0, r.stderr
    assert "tokens/s (decode, batch 2, ffn sparse, kernel cpu" in r.stderr
    assert "capacity" not in r.stderr  # the C++ reader has none (auto picks it on this CPU)
    assert r.stdout.startswith("[0] The ") and "\n[1] In the year" in r.stdout
    # Same tokens as in-process greedy decoding of the same step.
    from sparsejax import data, sharding, trained_run

    run = trained_run.load(relu_run)
    run.cfg = dataclasses.replace(run.cfg, mesh=dataclasses.replace(run.cfg.mesh, data=1))
    params, _ = run.params(run.steps[-1], sharding.plan(run.cfg.mesh, jax.devices()[:1]).mesh)
    dec = decode.Decoder(run.cfg.model, params)
    tok = data.ByteTokenizer()
    out = dec.generate([tok.encode("The "), tok.encode("In the year")], 12)
    assert r.stdout.splitlines()[0] == "[0] The " + tok.decode(out.tokens[0])
    assert _snapshot(relu_run) == before


@pytest.mark.slow
@pytest.mark.parametrize("case,args,message", [
    ("no checkpoint", ["--workdir", "{empty}", "--prompt", "x"], "config.json"),
    ("prompt too long", ["--workdir", "{run}", "--prompt", "x" * 520], "max_seq_len=512"),
    ("bad step", ["--workdir", "{run}", "--step", "7", "--prompt", "x"], "--step 7 not found"),
    ("bad top-p", ["--workdir", "{run}", "--prompt", "x", "--top-p", "2"], "--top-p"),
    ("bad ffn", ["--workdir", "{run}", "--prompt", "x", "--ffn", "fast"], "--ffn='fast'"),
    ("bad decode kernel", ["--workdir", "{run}", "--prompt", "x", "--ffn", "sparse",
                           "--decode-kernel", "fast"], "--decode-kernel='fast'"),
    ("unknown flag", ["--workdir", "{run}", "--prompt", "x", "--nucleus", "1"], "--nucleus"),
    ("no prompt", ["--workdir", "{run}"], "--prompt"),
    ("missing prompt file", ["--workdir", "{run}", "--prompt-file", "{empty}/p.txt"], "p.txt"),
    ("hf without tokenizer", ["--hf", "{hf}", "--prompt", "x"], "no tokenizer.json"),
])
def test_cli_bad_input_is_one_line_exit_2(relu_run, tmp_path, case, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    hf = tmp_path / "hf"
    hf.mkdir()
    src = ROOT / "tests" / "fixtures" / "hf" / "llama_gqa"
    for f in src.iterdir():
        if f.name != "tokenizer.json":
            (hf / f.name).symlink_to(f)
    before = _snapshot(relu_run)
    r = _cli(*[a.format(run=relu_run, empty=empty, hf=hf) for a in args])
    assert r.returncode == 2, (case, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("generate error: "), (case, r.stderr)
    assert message in lines[0], (case, lines[0])
    assert _snapshot(relu_run) == before
    assert not any(empty.iterdir())


@pytest.mark.slow
def test_cli_hf_sparse_exact_and_thresholded():
    """An imported checkpoint: MiniCPM's ReLU decodes the same tokens sparse and dense; Llama's
    SiLU runs thresholded and reports the loss change on validation text first."""
    hf = ROOT / "tests" / "fixtures" / "hf"
    args = ["--prompt", "Hello", "--max-new-tokens", "10"]
    dense = _cli("--hf", str(hf / "minicpm"), *args)
    sparse = _cli("--hf", str(hf / "minicpm"), *args, "--ffn", "sparse", "--decode-kernel", "xla")
    cpu = _cli("--hf", str(hf / "minicpm"), *args, "--ffn", "sparse", "--decode-kernel", "cpu")
    assert dense.returncode == 0 and sparse.returncode == 0, (dense.stderr, sparse.stderr)
    assert cpu.returncode == 0, cpu.stderr
    assert sparse.stdout == dense.stdout and "capacity per layer" in sparse.stderr
    assert cpu.stdout == dense.stdout and "kernel cpu" in cpu.stderr
    silu = _cli("--hf", str(hf / "llama_gqa"), *args, "--ffn", "sparse", "--threshold", "0.05")
    assert silu.returncode == 0, silu.stderr
    assert "FAT-eps 0.05; validation loss" in silu.stderr
