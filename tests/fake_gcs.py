"""An in-memory ``gs://`` for tests, registered at the fsspec layer that ``etils.epath`` uses
(``gcsfs`` in production): real reads and writes through the same path objects."""

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    """An object store in memory: no appends (``ab`` refused), whole-object writes."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]
    read_only: set = set()  # buckets whose writes fail, as without permission

    def __init__(self, *args, finalize_on_close=None, **kwargs):
        super().__init__(*args, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError("object stores cannot append")
        if "w" in mode and path.split("://")[-1].split("/")[0] in self.read_only:
            raise PermissionError(f"403 Forbidden: {path}")
        return super()._open(path, mode, **kwargs)


def install():
    """Register the fake for gs:// (and clear it); returns the class (its ``store`` is the data)."""
    from etils.epath import backend

    FakeGCS.store.clear()
    FakeGCS.read_only.clear()
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    return FakeGCS
