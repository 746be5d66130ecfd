"""Run-directory I/O through ``sparsejax.storage``: a local path, and ``gs://`` served by an
in-memory filesystem registered at the fsspec layer (what ``etils.epath`` calls for ``gs://``;
``gcsfs`` in production). Every check reads back what was written through the same paths.
"""

import json
import struct

import pytest

from sparsejax import plotting, results, rundir, storage, writers
from fake_gcs import install


@pytest.fixture
def gcs():
    yield install()
    install()  # leave it empty


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path, gcs):
    return storage.path(tmp_path / "run" if request.param == "local" else "gs://bucket/runs/run")


def _records(n, start=1):
    return [{"step": s, "loss": 5.0 - s / 10, "tokens_seen": 256 * s, "activation_ratio": 0.5,
             "activation_ratio_layers": [0.4, 0.6]} for s in range(start, start + n)]


def _train_records(n, start=1):
    return [results.TrainRecord.from_dict(r) for r in _records(n, start)]


def test_paths():
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/tmp/x")
    assert str(storage.path("gs://b/x/y")) == "gs://b/x/y"
    assert storage.path("relative").is_absolute()


def test_metrics_round_trip_resume_and_damage(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    w = writers.MetricsWriter(workdir)
    w.write(_records(5))
    w.sync()
    assert writers.read_jsonl(workdir / "metrics.jsonl") == _records(5)
    w.write(_records(3, start=6))
    w.close()
    assert [r["step"] for r in writers.read_jsonl(workdir / "metrics.jsonl")] == list(range(1, 9))
    # a resume from step 6: later lines dropped, then the same steps written again
    w = writers.MetricsWriter(workdir)
    w.truncate_after(6)
    assert [r["step"] for r in writers.read_jsonl(workdir / "metrics.jsonl")] == list(range(1, 7))
    w.write(_records(2, start=7))
    w.close()
    assert writers.read_jsonl(workdir / "metrics.jsonl") == _records(8)
    # a damaged line inside the file: dropped, original kept beside it
    text = (workdir / "metrics.jsonl").read_text().splitlines()
    text[2] = text[2][:10]
    (workdir / "metrics.jsonl").write_text("\n".join(text) + "\n")
    w = writers.MetricsWriter(workdir, tensorboard=False)
    w.truncate_after(8)
    w.close()
    assert [r["step"] for r in writers.read_jsonl(workdir / "metrics.jsonl")] == [1, 2, 4, 5, 6, 7, 8]
    assert (workdir / "metrics.jsonl.damaged").read_text().splitlines()[2] == text[2]


def _strict(line: str):
    """Parse as RFC 8259 JSON: NaN / Infinity are not JSON and fail here."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(line, parse_constant=refuse)


def test_metrics_lines_are_strict_json_with_non_finite_numbers_as_null(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    w = writers.MetricsWriter(workdir, tensorboard=False)
    record = {"step": 1, "loss": 5.0, "tokens_per_s": float("nan"), "mfu": float("inf"),
              "activation_ratio_layers": [0.5, float("-inf")]}
    w.write([record])
    w.truncate_after(1)  # the rewrite on resume encodes the same way
    w.close()
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [_strict(line) for line in lines] == [
        {"step": 1, "loss": 5.0, "tokens_per_s": None, "mfu": None,
         "activation_ratio_layers": [0.5, None]}]


def test_object_store_metrics_are_uploaded_whole_at_sync(gcs):
    """Between syncs the object keeps its last complete version (no partial appends)."""
    workdir = storage.path("gs://bucket/runs/lazy")
    w = writers.MetricsWriter(workdir, tensorboard=False)
    w._object.upload_every_s = 3600
    w.write(_records(2))
    assert not (workdir / "metrics.jsonl").exists()
    w.sync()
    w.write(_records(1, start=3))
    assert len(writers.read_jsonl(workdir / "metrics.jsonl")) == 2  # the last whole upload
    w.close()
    assert len(writers.read_jsonl(workdir / "metrics.jsonl")) == 3


def _event_tags(data: bytes) -> bytes:
    """Walk TFRecord framing (length, crc, payload, crc); returns the payloads joined."""
    out, i = b"", 0
    while i < len(data):
        (n,) = struct.unpack("Q", data[i:i + 8])
        out += data[i + 12:i + 12 + n]
        i += 12 + n + 4
    assert i == len(data)
    return out


def test_tensorboard_events(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    w = writers.MetricsWriter(workdir)
    w.write(_records(3))
    w.close()
    events = list((workdir / "tensorboard").iterdir())
    assert len(events) == 1
    payload = _event_tags(events[0].read_bytes())
    assert b"loss" in payload and b"activation_ratio_layers/1" in payload


def test_atomic_write_plot_and_move_previous(workdir):
    rundir.check_writable_dir(workdir, "--workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(workdir / "config.json", json.dumps({"a": 1}))
    assert json.loads((workdir / "config.json").read_text()) == {"a": 1}
    png = plotting.plot_activation_ratio(_train_records(4), workdir / "activation_ratio.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w = writers.MetricsWriter(workdir, tensorboard=False)
    w.write(_records(1))
    w.close()
    moved = rundir.move_previous_run(workdir)
    assert {p.name for p in moved.iterdir()} >= {"config.json", "activation_ratio.png", "metrics.jsonl"}
    assert not (workdir / "config.json").exists()
    assert [p.name for p in workdir.iterdir() if not p.name.startswith(".")] == ["previous"]


def test_unwritable_bucket_is_one_line(gcs):
    gcs.read_only.add("locked")
    with pytest.raises(rundir.RunDirError) as err:
        rundir.check_writable_dir(storage.path("gs://locked/runs/x"), "--workdir")
    msg = str(err.value)
    assert "\n" not in msg and "--workdir gs://locked/runs/x is not writable" in msg
    assert "403" in msg
    assert not gcs.store  # nothing written


def test_object_store_lock_is_a_record_not_an_exclusion(gcs, capsys):
    workdir = storage.path("gs://bucket/runs/locked")
    first = rundir.run_lock(workdir).acquire()
    assert isinstance(first, storage.ObjectLock)
    holder = json.loads((workdir / ".lock").read_text())
    second = rundir.run_lock(workdir).acquire()  # not refused: a bucket cannot lock
    assert second.warning and f"PID {holder['pid']}" in second.warning
    assert "object stores cannot lock" in capsys.readouterr().out
    second.release()
    assert not (workdir / ".lock").exists()
    first.release()  # already gone: no error


def test_local_lock_unchanged(tmp_path):
    lock = rundir.run_lock(tmp_path)
    assert isinstance(lock, rundir.RunLock)
    with lock, pytest.raises(rundir.RunDirError, match="is in use by PID"):
        rundir.RunLock(tmp_path).acquire()


def test_local_log_path(tmp_path):
    assert storage.local_log_path(tmp_path, "x.log") == tmp_path / "x.log"
    remote = storage.local_log_path(storage.path("gs://bucket/runs/r"), "x.log")
    assert remote.parent.is_dir() and str(remote).endswith("sparsejax/bucket/runs/r/x.log")
