"""The golden evaluation fixture: a tiny ReLU run rebuilt from frozen parameters.

``tests/golden/tiny_relu_params.npz`` holds the parameters of every kept checkpoint of one
160-step training run (written once by ``tests/golden/make_golden.py``); :func:`build_run`
writes them back as an ordinary run directory (``config.json`` + orbax checkpoints, the layout
``train.py`` writes), so the evaluator reads it exactly as it reads a trained run. No training
happens in the tests, so nothing amplifies the CPU's float rounding.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from flax import traverse_util

from sparsejax import checkpointing, config as config_lib, evaluation, rundir
from sparsejax import configure

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
PARAMS = GOLDEN / "tiny_relu_params.npz"
RESULTS = GOLDEN / "eval_results_tiny_relu.json"
RESULTS_CSV = RESULTS.with_suffix(".csv")  # eval.py's CSV of RESULTS, written beside it
METRICS = ("zero", "fat", "topk", "topk_global", "cett", "cett_ppl")


def config(steps: int = 160) -> config_lib.Config:
    """The fixture's training config (the one ``make_golden.py`` trained)."""
    cfg = config_lib.proxy_config("tiny", "relu")
    overrides = ["model.d_model=64", "model.n_layers=2", "model.d_ff=160", "model.n_heads=2",
                 "train.batch_size=8", "train.seq_len=64", f"train.steps={steps}",
                 "train.warmup_steps=20", "train.eval_every=1000", "train.checkpoint_every=40",
                 "train.keep_every=40", "train.keep_last=2", "train.eval_batches=3",
                 "train.log_every=40"]
    return configure.validate(configure.apply_overrides(cfg, overrides))


def flatten(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def stored_params() -> dict[int, dict]:
    """{step: params} from the npz (nested dicts of float32 numpy arrays)."""
    by_step: dict[int, dict] = {}
    with np.load(PARAMS) as z:
        for key in z.files:
            step, name = key.split("/", 1)
            by_step.setdefault(int(step), {})[name] = z[key]
    return {s: traverse_util.unflatten_dict(flat, sep="/") for s, flat in sorted(by_step.items())}


def build_run(workdir: pathlib.Path) -> pathlib.Path:
    """A run directory holding the frozen checkpoints, readable by ``trained_run.load``."""
    cfg = config()
    workdir.mkdir(parents=True)
    (workdir / rundir.CONFIG).write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    ckpt = checkpointing.Checkpointer(workdir / rundir.CHECKPOINTS, keep_last=100, keep_every=None)
    try:
        for step, params in stored_params().items():
            meta = {"step": step, "tokens_seen": step * tokens_per_step, "seed": cfg.train.seed,
                    "config": config_lib.to_dict(cfg)}
            ckpt.save(step, {"params": params}, meta)
            ckpt.wait()
    finally:
        ckpt.close()
    return workdir


def evaluate(workdir: pathlib.Path) -> dict:
    """The evaluator's results on the fixture, as JSON reads them back (no timing, no path)."""
    options = evaluation.EvalOptions(metrics=METRICS, joint_last=3)
    results = evaluation.evaluate_run(workdir, options, progress=False)
    for key in ("workdir", "seconds"):
        results.pop(key)
    return json.loads(json.dumps(results))
