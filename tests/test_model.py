import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import activations, config, configure, model, sparsity
from sparsejax.config import ModelConfig
from sparsejax.loss import next_token_loss
from sparsejax.sparsity import Sparsity
from sparsejax.sparsity_plan import SparsityPlan

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, head_dim=16, d_ff=80,
                   max_seq_len=32)


def _cfg(**kw):
    import dataclasses
    return dataclasses.replace(TINY, **kw)


def _ffn_params(cfg, seed=0):
    ffn = model.FeedForward(cfg)
    x = jax.random.normal(jax.random.key(seed), (2, 5, cfg.d_model))
    params = nn.meta.unbox(ffn.init(jax.random.key(seed + 1), x))["params"]
    return ffn, x, params


@pytest.mark.parametrize("ffn_type", ["gated", "plain"])
@pytest.mark.parametrize("act", ["relu", "silu", "drelu", "relu2"])
def test_ffn_matches_naive_einsum(ffn_type, act):
    cfg = _cfg(ffn_type=ffn_type, activation=act)
    ffn, x, p = _ffn_params(cfg)
    out, state = ffn.apply({"params": p}, x, mutable=["intermediates"])
    sigma = activations.make(act)
    xn = np.asarray(x, np.float64)
    w_in, w_out = np.asarray(p["w_in"]["kernel"], np.float64), np.asarray(p["w_out"]["kernel"], np.float64)
    up = np.einsum("bld,df->blf", xn, w_in)
    if ffn_type == "gated":
        assert set(p) == {"w_in", "w_gate", "w_out"}
        gate = np.asarray(sigma(jnp.asarray(np.einsum("bld,df->blf", xn, np.asarray(p["w_gate"]["kernel"], np.float64)))))
        if act == "drelu":
            up = np.maximum(up, 0)
        hidden = gate * up
        act_expected = gate
    else:
        assert set(p) == {"w_in", "w_out"}
        hidden = np.asarray(sigma(jnp.asarray(up)))
        act_expected = hidden
    want = np.einsum("blf,fd->bld", hidden, w_out)
    assert out.shape == (2, 5, cfg.d_model)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-6)
    inter = state["intermediates"]
    np.testing.assert_allclose(inter["activation"][0], act_expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(inter["hidden"][0], hidden, rtol=1e-4, atol=1e-6)


def test_intermediates_absent_unless_requested():
    ffn, x, p = _ffn_params(_cfg())
    out = ffn.apply({"params": p}, x)
    assert isinstance(out, jax.Array)  # no state tuple: nothing was sown


def test_topk_mask_exact_k_and_matches_argsort():
    score = np.random.default_rng(0).normal(size=(7, 3, 50)).astype(np.float32)
    for k in (1, 5, 49, 50):
        mask = np.asarray(sparsity.topk_keep(jnp.asarray(score), k))
        assert mask.shape == score.shape
        np.testing.assert_array_equal(mask.sum(-1), k)
        want = np.zeros_like(score)
        np.put_along_axis(want, np.argsort(-score, axis=-1)[..., :k], 1.0, axis=-1)
        np.testing.assert_array_equal(mask, want)


def test_topk_mask_ties_still_exactly_k():
    score = jnp.ones((4, 10))
    mask = np.asarray(sparsity.topk_keep(score, 3))
    np.testing.assert_array_equal(mask.sum(-1), 3)


@pytest.mark.parametrize("k", [0, -1, 51])
def test_topk_mask_rejects_bad_k(k):
    with pytest.raises(ValueError, match="d_ff=50"):
        sparsity.topk_keep(jnp.ones((2, 50)), k)


def test_approx_topk_recall():
    score = jax.random.normal(jax.random.key(3), (256, 512))
    k = 64
    approx = np.asarray(sparsity.topk_keep(score, k, approximate=True, recall=0.95))
    exact = np.asarray(sparsity.topk_keep(score, k))
    np.testing.assert_array_equal(approx.sum(-1), k)
    recall = (approx * exact).sum() / exact.sum()
    assert recall >= 0.95


@pytest.mark.parametrize("ffn_type", ["gated", "plain"])
def test_topk_ffn_keeps_k_largest_activations(ffn_type):
    cfg = _cfg(ffn_type=ffn_type, activation="silu")
    ffn, x, p = _ffn_params(cfg)
    _, state = ffn.apply({"params": p}, x, Sparsity(topk_k=12), mutable=["intermediates"])
    act = np.asarray(state["intermediates"]["activation"][0])
    hidden = np.asarray(state["intermediates"]["hidden"][0])
    assert ((hidden != 0).sum(-1) == 12).all()
    keep = np.zeros_like(act)
    np.put_along_axis(keep, np.argsort(-np.abs(act), axis=-1)[..., :12], 1.0, axis=-1)
    np.testing.assert_array_equal(hidden != 0, keep.astype(bool))


def test_topk_fraction_and_full_k_equal_dense():
    cfg = _cfg(activation="silu")
    ffn, x, p = _ffn_params(cfg)
    dense = ffn.apply({"params": p}, x)
    # k = d_ff is no mask: the plan leaves it out of the model's input.
    full_cfg = configure.apply_overrides(config.proxy_config("tiny"), ["sparsity.topk=320"])
    full_input = SparsityPlan.of(full_cfg).model_input()
    assert full_input.topk_k == 0 and not full_input.trained_topk
    np.testing.assert_array_equal(dense, ffn.apply({"params": p}, x, full_input))
    quarter = configure.apply_overrides(config.proxy_config("tiny"), ["sparsity.topk=0.25"])
    assert SparsityPlan.of(quarter).model_input().topk_k == 80  # the one rule: 320 − int(240)


@pytest.mark.parametrize("ffn_type", ["gated", "plain"])
def test_topk_straight_through_gradient(ffn_type):
    """Per-neuron weight gradients for one token and a linear loss sum(out·c), so the upstream
    gradient does not depend on the forward values: kept neurons get the dense gradient in both
    modes; dropped neurons get zero without STE and the dense gradient with STE (Q-Sparse)."""
    cfg_dense = _cfg(activation="silu", ffn_type=ffn_type)
    dense_in, mask_in, ste_in = Sparsity(), Sparsity(topk_k=10), Sparsity(topk_k=10, topk_ste=True)
    ffn, _, p = _ffn_params(cfg_dense)
    x = jax.random.normal(jax.random.key(5), (1, 1, cfg_dense.d_model))
    c = jax.random.normal(jax.random.key(9), (1, 1, cfg_dense.d_model))
    first = "w_gate" if ffn_type == "gated" else "w_in"

    def first_layer_grad(sp):
        loss = lambda params: jnp.sum(ffn.apply({"params": params}, x, sp) * c)  # noqa: E731
        return np.asarray(jax.grad(loss)(p)[first]["kernel"])

    g_dense, g_mask, g_ste = (first_layer_grad(sp) for sp in (dense_in, mask_in, ste_in))
    out_mask = ffn.apply({"params": p}, x, mask_in, mutable=["intermediates"])[1]
    kept_F = np.asarray(out_mask["intermediates"]["hidden"][0])[0, 0] != 0
    assert kept_F.sum() == 10
    np.testing.assert_allclose(g_mask[:, kept_F], g_dense[:, kept_F], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g_mask[:, ~kept_F], 0.0)
    np.testing.assert_allclose(g_ste, g_dense, rtol=1e-5, atol=1e-7)
    assert np.abs(g_dense[:, ~kept_F]).max() > 0  # the check above is not vacuous
    # The forward pass of STE and plain masking is the same.
    np.testing.assert_array_equal(ffn.apply({"params": p}, x, ste_in),
                                  ffn.apply({"params": p}, x, mask_in))


def test_sparse_forward_threshold_zero_is_dense_and_masks_work():
    cfg = _cfg(activation="relu")
    m = model.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    v = m.init(jax.random.key(1), tokens)
    dense = m.apply(v, tokens)
    zero = m.apply(v, tokens, sparsity=Sparsity(thresholds=jnp.zeros((cfg.n_layers, cfg.d_ff))))
    np.testing.assert_array_equal(dense, zero)
    big = jnp.full((cfg.n_layers, cfg.d_ff), 1e9)
    # Every neuron dropped == a model whose W_out is zero.
    no_ffn = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "w_out" in jax.tree_util.keystr(path) else x, v)
    want = m.apply(no_ffn, tokens)
    assert np.abs(np.asarray(want) - np.asarray(dense)).max() > 1e-4  # the FFN matters
    for target in model.MASK_TARGETS:
        masked, st = m.apply(v, tokens, sparsity=Sparsity(thresholds=big, mask_target=target),
                             mutable=["intermediates"])
        np.testing.assert_allclose(masked, want, rtol=1e-5, atol=1e-5)
        # The sown hidden is taken before the evaluation mask (the evaluator measures activity).
        _, hiddens = model.ffn_intermediates(st, cfg.n_layers)
        assert all(float(jnp.abs(h).max()) > 0 for h in hiddens)
    with pytest.raises(ValueError, match="mask_target"):
        Sparsity(thresholds=big, mask_target="bogus")


def test_causality():
    cfg = _cfg(activation="silu")
    m = model.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, cfg.vocab_size)
    v = m.init(jax.random.key(1), tokens)
    topk = Sparsity(topk_k=20)
    base = np.asarray(m.apply(v, tokens, sparsity=topk))
    for t in (0, 7, 15):
        changed = tokens.at[0, t].set((tokens[0, t] + 1) % cfg.vocab_size)
        out = np.asarray(m.apply(v, changed, sparsity=topk))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])


def test_every_parameter_has_logical_axes():
    for tie in (True, False):
        cfg = _cfg(tie_embeddings=tie)
        v = model.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        leaves = jax.tree.leaves(v["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
        for leaf in leaves:
            assert len(leaf.names) == leaf.value.ndim
            assert set(leaf.names) <= {"vocab", "embed", "mlp", "heads", "kv", "norm"}


@pytest.mark.slow
def test_golden_initial_loss_is_log_vocab():
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, head_dim=32, d_ff=160,
                      max_seq_len=64, activation="relu")
    m = model.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (4, 33), 0, cfg.vocab_size)
    v = m.init(jax.random.key(42), tokens[:, :-1])
    loss, count = next_token_loss(m.apply(v, tokens[:, :-1]), tokens[:, 1:])
    assert count == 4 * 32
    assert abs(float(loss) - math.log(256)) < 0.02


def test_bfloat16_compute_close_to_float32():
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, TINY.vocab_size)
    m32, m16 = model.Transformer(_cfg()), model.Transformer(_cfg(dtype="bfloat16"))
    v = m32.init(jax.random.key(1), tokens)
    out32, out16 = m32.apply(v, tokens), m16.apply(v, tokens)
    assert out16.dtype == jnp.float32 and out16.shape == out32.shape
    np.testing.assert_allclose(out16, out32, atol=5e-2)


def test_rope_preserves_norm_and_relative_position():
    x = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
    pos = jnp.arange(6)[None]
    y = model.rope(x, pos, 10_000.0)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    q = jnp.broadcast_to(x[:, :1], x.shape)
    # ⟨R_m q, R_n q⟩ depends on m − n only.
    rq = model.rope(q, pos, 10_000.0)
    rq_shift = model.rope(q, pos + 3, 10_000.0)
    np.testing.assert_allclose(jnp.einsum("blhk,bmhk->blmh", rq, rq),
                               jnp.einsum("blhk,bmhk->blmh", rq_shift, rq_shift), rtol=1e-4, atol=1e-5)


def test_causal_attention_equals_jax_dot_product_attention():
    """The written-out einsum attention against JAX's own causal implementation."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 9, 3, 8)) for i in range(3))
    ours = model.causal_attention(q, k, v)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    # Causality: a change in the last position leaves every earlier output unchanged.
    v2 = v.at[:, -1].add(1.0)
    np.testing.assert_allclose(model.causal_attention(q, k, v2)[:, :-1], ours[:, :-1], atol=1e-6)


def test_rope_constant_tables_equal_the_traced_tables_at_default_positions():
    """Default positions use numpy constants; explicit positions compute in-graph: same angles."""
    x = jax.random.normal(jax.random.key(0), (2, 17, 3, 8))
    pos = jnp.broadcast_to(jnp.arange(17), (2, 17))
    const = model.apply_rope(x, model.rope_tables(None, 17, 8, 10_000.0))
    traced = model.apply_rope(x, model.rope_tables(pos, 17, 8, 10_000.0))
    np.testing.assert_allclose(const, traced, rtol=1e-5, atol=1e-5)


# ------------------------------------------------- grouped-query attention, MiniCPM scalings
def test_default_parameter_tree_unchanged_by_the_new_options():
    """n_kv_heads = n_heads and neutral scalings: the same parameters (paths, shapes, values)
    and logits as the default model, so earlier checkpoints restore unchanged."""
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, TINY.vocab_size)
    base = model.Model(TINY)
    params = base.init(jax.random.key(1), 12)
    explicit = model.Model(_cfg(n_kv_heads=TINY.n_heads, scale_emb=1.0, scale_depth=0.0,
                                dim_model_base=0))
    same = explicit.init(jax.random.key(1), 12)
    assert jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, same) == jax.tree.map(
        lambda a: True, params)
    np.testing.assert_array_equal(base.apply(params, tokens)[0], explicit.apply(params, tokens)[0])


def test_grouped_query_attention_equals_multi_head_with_repeated_kv():
    """GQA with G key/value heads = multi-head attention whose key/value weights repeat each
    group's weights for its n_heads / G query heads (an independent construction)."""
    cfg = _cfg(n_heads=4, head_dim=8, n_kv_heads=2)
    gqa = model.Model(cfg)
    params = gqa.init(jax.random.key(2), 12)
    assert params["layer_0"]["attn"]["key"]["kernel"].shape == (32, 2, 8)
    mha_params = jax.tree.map(lambda a: a, params)
    for i in range(cfg.n_layers):
        for name in ("key", "value"):
            w = params[f"layer_{i}"]["attn"][name]["kernel"]
            mha_params[f"layer_{i}"]["attn"][name] = {"kernel": np.repeat(np.asarray(w), 2, axis=1)}
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
    mha = model.Model(_cfg(n_heads=4, head_dim=8))
    np.testing.assert_allclose(gqa.apply(params, tokens)[0], mha.apply(mha_params, tokens)[0],
                               rtol=1e-5, atol=1e-5)
    specs = gqa.param_specs(12)
    assert tuple(specs["layer_0"]["attn"]["key"]["kernel"]) == ("embed", "kv_heads", "kv")


def _final_hidden_and_logits(m: model.Model, params, tokens):
    """(the final norm's output, logits): the hidden state the output head reads."""
    logits, state = m.module.apply(
        {"params": params}, tokens, capture_intermediates=lambda mdl, _: isinstance(mdl, model.RMSNorm),
        mutable=["intermediates"])
    return state["intermediates"]["final_norm"]["__call__"][0], logits


@pytest.mark.parametrize("tie", [True, False])
def test_logit_scale_and_output_projection_give_the_logits(tie):
    """logits = (final hidden × logit_scale) · output_projection, with MiniCPM's
    dim_model_base / d_model; the unscaled model's logits are the same hidden times W."""
    cfg = _cfg(dim_model_base=8, tie_embeddings=tie)
    m = model.Model(cfg)
    params = m.init(jax.random.key(4), 10)
    tokens = jax.random.randint(jax.random.key(5), (2, 10), 0, cfg.vocab_size)
    hidden, logits = _final_hidden_and_logits(m, params, tokens)
    w = np.asarray(model.output_projection(params, cfg), np.float64)
    assert w.shape == (cfg.d_model, cfg.vocab_size) and model.logit_scale(cfg) == 8 / 32
    np.testing.assert_allclose(logits, np.asarray(hidden, np.float64) * 0.25 @ w, rtol=1e-5,
                               atol=1e-6)
    unscaled = model.Model(_cfg(tie_embeddings=tie)).apply(params, tokens)[0]
    np.testing.assert_allclose(logits, np.asarray(unscaled) * 0.25, rtol=1e-5, atol=1e-6)


def test_residual_and_embedding_scales():
    """scale_depth = sqrt(n_layers) is a residual multiplier of 1 (the default model); a residual
    scale s on a model whose blocks are zeroed except one FFN changes only that branch's size;
    scale_emb multiplies the embedding rows that enter the first block."""
    params = model.Model(TINY).init(jax.random.key(6), 8)
    tokens = jax.random.randint(jax.random.key(7), (2, 8), 0, TINY.vocab_size)
    neutral = model.Model(_cfg(scale_depth=math.sqrt(TINY.n_layers)))
    np.testing.assert_allclose(neutral.apply(params, tokens)[0], model.Model(TINY).apply(params, tokens)[0],
                               rtol=1e-6, atol=1e-6)
    assert model.residual_scale(_cfg(scale_depth=1.4, n_layers=4)) == pytest.approx(0.7)

    # One layer, attention output zeroed: hidden = e·s_emb + r·FFN(norm(e·s_emb)); the final norm
    # is undone by comparing with a numpy computation of the same expression.
    cfg = _cfg(n_layers=1, scale_emb=3.0, scale_depth=2.0)
    m = model.Model(cfg)
    p = m.init(jax.random.key(8), 8)
    p["layer_0"]["attn"]["out"]["kernel"] = jnp.zeros_like(p["layer_0"]["attn"]["out"]["kernel"])
    hidden, _ = _final_hidden_and_logits(m, p, tokens)
    e = np.asarray(p["embed"]["embedding"], np.float64)[np.asarray(tokens)] * 3.0

    def rms(x, w):
        return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + cfg.norm_eps) * w

    f = p["layer_0"]["ffn"]
    h = rms(e, np.asarray(p["layer_0"]["ffn_norm"]["scale"]))
    ffn = (np.maximum(h @ np.asarray(f["w_gate"]["kernel"]), 0) * (h @ np.asarray(f["w_in"]["kernel"]))
           ) @ np.asarray(f["w_out"]["kernel"])
    expected = rms(e + 2.0 / math.sqrt(1) * ffn, np.asarray(p["final_norm"]["scale"]))
    np.testing.assert_allclose(hidden, expected, rtol=1e-4, atol=1e-5)


def test_linear_rope_scaling_equals_interpolated_positions():
    """rope_type "linear" with factor f at positions 0..L-1 = default RoPE at positions p / f
    (position interpolation), through the traced-positions path."""
    plain = _cfg(init_std=0.5)  # large weights: attention (and so RoPE) shapes the logits
    cfg = _cfg(init_std=0.5, rope_type="linear", rope_factor=2.0)
    params = model.Model(plain).init(jax.random.key(9), 10)
    tokens = jax.random.randint(jax.random.key(10), (2, 10), 0, TINY.vocab_size)
    scaled = model.Transformer(cfg).apply({"params": params}, tokens)
    positions = jnp.broadcast_to(jnp.arange(10, dtype=jnp.float32) / 2.0, (2, 10))
    interpolated = model.Transformer(plain).apply({"params": params}, tokens, positions)
    np.testing.assert_allclose(scaled, interpolated, rtol=1e-4, atol=1e-4)
    assert not np.allclose(scaled, model.Transformer(plain).apply({"params": params}, tokens),
                           atol=1e-2)


def test_llama3_rope_frequencies_keep_stretch_and_interpolate():
    """The three bands of Llama 3.1's scaling: short wavelengths kept, long ones divided by the
    factor, the middle between the two (monotone in wavelength)."""
    cfg = _cfg(head_dim=32, rope_theta=10_000.0, rope_type="llama3", rope_factor=8.0,
               rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=64)
    freq = model.rope_frequencies(cfg)
    base = 10_000.0 ** (-np.arange(16) / 16)
    wavelen = 2 * np.pi / base
    short, long = wavelen < 64 / 4, wavelen > 64
    middle = ~short & ~long
    assert short.any() and long.any() and middle.any()
    np.testing.assert_allclose(freq[short], base[short])
    np.testing.assert_allclose(freq[long], base[long] / 8)
    ratio = freq[middle] / base[middle]
    assert np.all((ratio > 1 / 8) & (ratio < 1)) and np.all(np.diff(ratio) < 0)
    assert model.rope_frequencies(_cfg()) is None  # default: rope_tables' own θ^(-j/(K/2))
