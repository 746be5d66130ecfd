"""Writing small text or binary files for the data tests."""

import pathlib


def write(path: pathlib.Path, content: str | bytes) -> pathlib.Path:
    """``content`` at ``path`` (parents created): bytes as they are, text as UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path
