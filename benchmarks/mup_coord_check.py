#!/usr/bin/env python
"""µP coordinate check (Yang et al. 2022, Tensor Programs V, §D.1): the size of each layer's
activations, and of how much they moved from initialisation, after a few AdamW steps, across widths.

    python benchmarks/mup_coord_check.py [--widths 32,64,128,256,512] [--steps 4] [--lr 1e-2]
        [--mup-base 32] [--json notebooks/results/mup_coord_check.json]

For each width (d_model; 2 layers, heads of 16, gated ReLU FFN of 2.5·d_model, byte vocabulary) and
each parameterisation (standard, and µP with widths measured against ``--mup-base``, MiniCPM's
constants otherwise), the real model and optimizer (``sparsejax.model``, ``sparsejax.optim``, no
clipping, constant LR) train ``--steps`` steps on one fixed batch of the embedded corpus. After each
step every site's output on that batch is recorded as its mean absolute coordinate (the "l1" of the
coordinate check), with its change from step 0. Sites: the token embedding, each block's attention
and FFN outputs (residual branches before their scaling), the FFN activation σ(gate), the residual
stream after each block, and the logits.

Under µP those sizes stay O(1) as the width grows (slopes of log size against log width near 0);
under standard parameterisation with one learning rate, the updates of the hidden and output layers
grow with width (Adam's update of a d-wide matrix moves its output by ~d·lr). The table prints, per
site, the size at each width and the slope; ``tests/test_mup.py`` asserts the contrast on a smaller
grid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEAD_DIM = 16
N_LAYERS = 2


def width_config(width: int, mup_base: int, lr: float, *, n_layers: int = N_LAYERS, seq_len: int = 64):
    """The coordinate check's model at one width (``mup_base`` 0: standard parameterisation)."""
    from sparsejax import config, configure
    from sparsejax.sweep import protocol

    sets = [f"model.d_model={width}", f"model.n_layers={n_layers}", f"model.n_heads={max(1, width // HEAD_DIM)}",
            f"model.head_dim={min(HEAD_DIM, width)}", f"model.d_ff={protocol.gated_d_ff(width)}",
            f"train.learning_rate={lr}", "train.warmup_steps=0", "train.schedule=constant",
            "train.grad_clip=0", f"train.seq_len={seq_len}"]
    sets += list(protocol.mup_overrides(mup_base)) if mup_base else []
    return configure.apply_overrides(config.proxy_config("tiny"), sets)


def _batch(seq_len: int, batch: int, seed: int):
    import numpy as np

    from sparsejax import data

    corpus = np.frombuffer(data.load_corpus_text().encode("utf-8"), np.uint8).astype(np.int32)
    starts = np.random.default_rng(seed).integers(0, len(corpus) - seq_len - 1, batch)
    rows = np.stack([corpus[s:s + seq_len + 1] for s in starts])
    return rows[:, :-1], rows[:, 1:]


def _sites(cfg, params, tokens_BxL):
    """{site: output array} of one forward pass (flax's captured intermediates)."""
    import jax
    from flax.traverse_util import flatten_dict

    from sparsejax import model as model_lib

    kinds = (model_lib.Attention, model_lib.FeedForward, model_lib.Block, model_lib.Transformer)
    module = model_lib.Transformer(cfg.model)
    _, state = module.apply({"params": params}, tokens_BxL, mutable=["intermediates"],
                            capture_intermediates=lambda mdl, name: name == "__call__" and (
                                isinstance(mdl, kinds) or mdl.name == "embed"))
    out = {}
    for path, value in flatten_dict(state["intermediates"]).items():
        value = value[0] if isinstance(value, tuple) else value
        names = [p for p in path if p != "__call__"]
        if not names:
            out["logits"] = value
        elif names[-1] in ("attn", "ffn", "embed") or names[-1].startswith("layer_"):
            out["/".join(names) if names[-1] != "embed" else "embed"] = value
        elif names[-1] == "activation":
            out["/".join(names)] = value
    return jax.tree.map(lambda a: a.astype("float32"), out)


def coordinate_check(widths, mup_base: int, *, steps: int = 4, lr: float = 1e-2, batch: int = 8,
                     seq_len: int = 64, seed: int = 0) -> list[dict]:
    """Rows {width, step, site, size, change} for every width, step (0…steps) and site: ``size`` the
    mean |x|, ``change`` the mean |x_t − x_0| of the site's output on a fixed batch."""
    import jax
    import jax.numpy as jnp
    import optax

    from sparsejax import model as model_lib, optim

    inputs, targets = _batch(seq_len, batch, seed)
    rows = []
    for width in widths:
        cfg = width_config(width, mup_base, lr, seq_len=seq_len)
        params = model_lib.Model(cfg.model).init(jax.random.key(seed), seq_len)
        tx = optim.make_optimizer(cfg)
        opt_state = tx.init(params)

        def loss_fn(p):
            logits = model_lib.Transformer(cfg.model).apply({"params": p}, inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        @jax.jit
        def update(p, s):
            grads = jax.grad(loss_fn)(p)
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s

        sites = jax.jit(lambda p: _sites(cfg, p, inputs))
        first = sites(params)
        for t in range(steps + 1):
            now = first if t == 0 else sites(params)
            for name in first:
                rows.append({"width": width, "step": t, "site": name,
                             "size": float(jnp.abs(now[name]).mean()),
                             "change": float(jnp.abs(now[name] - first[name]).mean())})
            if t < steps:
                params, opt_state = update(params, opt_state)
    return rows


def slopes(rows: list[dict], key: str, step: int) -> dict[str, float]:
    """Per site: the least-squares slope of log2(row[key]) on log2(width) at ``step``."""
    import numpy as np

    out = {}
    for site in sorted({r["site"] for r in rows}):
        pts = [(r["width"], r[key]) for r in rows if r["site"] == site and r["step"] == step and r[key] > 0]
        if len(pts) >= 2:
            w, v = np.log2(np.array(pts, dtype=float)).T
            out[site] = float(np.polyfit(w, v, 1)[0])
    return out


def table(rows: list[dict], key: str, step: int, title: str) -> str:
    widths = sorted({r["width"] for r in rows})
    slope = slopes(rows, key, step)
    lines = [f"{title}: mean |{'x_t - x_0' if key == 'change' else 'x_t'}| at step {step}; slope = "
             f"d log(size) / d log(width)",
             "| site | " + " | ".join(f"d={w}" for w in widths) + " | slope |",
             "|---|" + "---|" * (len(widths) + 1)]
    for site in sorted(slope):
        cells = [next(r[key] for r in rows if r["site"] == site and r["step"] == step and r["width"] == w)
                 for w in widths]
        lines.append(f"| {site} | " + " | ".join(f"{c:.3g}" for c in cells) + f" | {slope[site]:+.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="32,64,128,256,512")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--mup-base", type=int, default=32)
    ap.add_argument("--json", type=Path, help="write the rows of both parameterisations here")
    args = ap.parse_args(argv)
    try:
        widths = sorted({int(w) for w in args.widths.split(",") if w.strip()})
    except ValueError:
        ap.error(f"--widths {args.widths!r} must be comma-separated integers")
    if len(widths) < 2 or min(widths) < 1 or args.steps < 1 or args.lr <= 0 or args.mup_base < 1:
        ap.error("need >= 2 widths >= 1, --steps >= 1, --lr > 0 and --mup-base >= 1")
    result = {}
    for name, base in (("standard", 0), ("mup", args.mup_base)):
        rows = coordinate_check(widths, base, steps=args.steps, lr=args.lr)
        result[name] = {"mup_base": base, "rows": rows, "change_slopes": slopes(rows, "change", args.steps),
                        "size_slopes": slopes(rows, "size", args.steps)}
        label = "standard parameterisation" if not base else f"µP (base {base})"
        print(table(rows, "change", args.steps, label) + "\n")
        print(table(rows, "size", args.steps, label) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"widths": widths, "steps": args.steps, "lr": args.lr, **result},
                                        indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
