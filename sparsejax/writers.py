"""Training metrics: ``metrics.jsonl`` (one JSON line per step) and TensorBoard events.

Every line is strict JSON (RFC 8259): a value that is not a finite number (a NaN tokens/s of a
window too short to time, an infinite perplexity) is written as ``null``, so any JSON reader
(``jq``, pandas) reads the file; :func:`json_line` is the one encoder.

The activation-ratio plot is drawn by :func:`sparsejax.plotting.plot_activation_ratio`."""

from __future__ import annotations

import json
import math
import pathlib
import shutil
from typing import Iterable

from sparsejax import rundir, storage


def _finite_or_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def json_line(record: dict) -> str:
    """One strict-JSON line of ``metrics.jsonl``: non-finite numbers as ``null``."""
    return json.dumps(_finite_or_null(record), allow_nan=False)


class MetricsWriter:
    """Appends one JSON object per step; TensorBoard scalars alongside when available.

    In an object store (``gs://`` workdir) the file cannot be appended to: it is kept by a
    :class:`sparsejax.storage.ObjectLog` (whole-object rewrites, at most once a minute, at every
    :meth:`sync` — the trainer calls it before each checkpoint — and on close).
    """

    def __init__(self, workdir: pathlib.Path, *, enabled: bool = True, tensorboard: bool = True):
        self.path = rundir.RunDir(workdir).metrics
        self.enabled = enabled
        self._tb = None
        self._object = storage.ObjectLog(self.path) if enabled and storage.is_remote(self.path) else None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            if self._object is not None:
                storage.register_tensorboard()

            self._tb = SummaryWriter(str(rundir.RunDir(workdir).tensorboard))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > step (they are recomputed identically after a resume).

        Lines that do not parse (a torn write from a crash, a full disk) are dropped with a
        warning; the damaged file is kept beside it as ``metrics.jsonl.damaged``.
        """
        if not (self.enabled and self.path.exists()):
            return
        records, bad = read_jsonl(self.path, skip_bad=True)
        bad_inside = [n for n in bad if n != _line_count(self.path)]  # a torn last line is normal
        if bad_inside:
            keep = self.path.with_name(self.path.name + ".damaged")
            if self._object is not None:
                keep.write_bytes(self.path.read_bytes())
            else:
                shutil.copyfile(self.path, keep)
            print(f"WARNING: {self.path}: dropped {len(bad_inside)} unreadable line(s) "
                  f"(line {', '.join(map(str, bad_inside[:5]))}); the original is kept as {keep}",
                  flush=True)
        kept = [json_line(r) for r in records
                if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step]
        text = "".join(line + "\n" for line in kept)
        if self._object is not None:
            self._object.replace(text)
        else:
            rundir.atomic_write(self.path, text)

    def write(self, records: Iterable[dict]) -> None:
        if not self.enabled:
            return
        records = list(records)
        text = "".join(json_line(record) + "\n" for record in records)
        if self._object is not None:
            self._object.append(text)
        else:
            with self.path.open("a") as f:
                f.write(text)
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

    def sync(self) -> None:
        """Make every record written so far durable (a no-op for local files: appends are)."""
        if self._object is not None:
            self._object.sync()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self.sync()


def _line_count(path: pathlib.Path) -> int:
    return len([line for line in storage.path(path).read_text().splitlines() if line.strip()])


def read_jsonl(path: pathlib.Path, *, skip_bad: bool = False):
    """Records of a metrics file; a torn last line (process killed mid-write) is ignored.

    Damage elsewhere raises ``json.JSONDecodeError`` unless ``skip_bad``, in which case the
    result is ``(records, numbers of the bad lines, 1-based)``.
    """
    lines = [line for line in storage.path(path).read_text().splitlines() if line.strip()]
    records, bad = [], []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if skip_bad:
                bad.append(i + 1)
            elif i != len(lines) - 1:
                raise
    return (records, bad) if skip_bad else records
