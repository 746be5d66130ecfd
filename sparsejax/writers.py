"""Run outputs: JSONL metrics (one line per step), TensorBoard events and the activation plot."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Iterable

import numpy as np


class MetricsWriter:
    """Appends one JSON object per step; TensorBoard scalars alongside when available."""

    def __init__(self, workdir: pathlib.Path, *, enabled: bool = True, tensorboard: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > step (they are recomputed identically after a resume)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [json.dumps(r, allow_nan=True) for r in read_jsonl(self.path) if r["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, records: Iterable[dict]) -> None:
        if not self.enabled:
            return
        records = list(records)
        with self.path.open("a") as f:
            for record in records:
                f.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for record in records:
                for key, value in record.items():
                    if key == "step":
                        continue
                    if isinstance(value, list):
                        for i, v in enumerate(value):
                            self._tb.add_scalar(f"{key}/{i}", v, record["step"])
                    elif isinstance(value, (int, float)) and math.isfinite(value):
                        self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: pathlib.Path) -> list[dict]:
    """Records of a metrics file; a torn last line (process killed mid-write) is ignored."""
    lines = [line for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def plot_activation_ratio(records: list[dict], out_path: pathlib.Path, title: str = "") -> pathlib.Path:
    """Activation ratio vs tokens seen: one thin line per layer, the layer mean in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "activation_ratio_layers" in r]
    if not rows:
        raise ValueError("no activation-ratio records to plot (was activation logging off?)")
    tokens = np.array([r["tokens_seen"] for r in rows], dtype=np.float64)
    per_layer = np.array([r["activation_ratio_layers"] for r in rows]) * 100
    mean = np.array([r["activation_ratio"] for r in rows]) * 100
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    for i in range(per_layer.shape[1]):
        ax.plot(tokens, per_layer[:, i], lw=0.9, alpha=0.7, color=cmap(i / max(per_layer.shape[1] - 1, 1)),
                label=f"layer {i}")
    ax.plot(tokens, mean, lw=2.5, color="black", label="mean over layers")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("activation ratio (%)")
    ax.set_title(title or "FFN activation ratio during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out_path = pathlib.Path(out_path)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
