"""Config files and ``--set section.field=value`` overrides (parsing only; validation is
:func:`sparsejax.configure.validate`'s)."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any, Sequence

from sparsejax.config.schema import MOVED_FIELDS, Config, ConfigError, moved_path
from sparsejax.schedules import Schedule


def _parse_value(path: str, text: str, annotation: Any) -> Any:
    """Parse override text to the field's declared type (annotations are strings here)."""
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if kind in ("tuple[float, ...]", "tuple[int, ...]", "tuple[str, ...]"):
        # Comma-separated: sparsity.l1.values=0,1e-4,5e-4 (empty text: the empty tuple).
        item = kind[len("tuple["):-len(", ...]")]
        return tuple(_parse_value(path, part.strip(), item) for part in text.split(",") if part.strip())
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{path}={text!r}: expected a boolean (true/false)")
    try:
        if kind == "int":
            as_float = float(text)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if kind == "float":
            return float(text)
    except ValueError:
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(f"{path}={text!r}: expected {article} {kind}") from None
    if kind == "str":
        return text
    raise ConfigError(f"{path} has type {kind!r}, which cannot be set from the command line")


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of cfg with ``section.field=value`` overrides applied (each parsed to its field's
    type; unknown fields and unparsable values are ConfigErrors); not validated."""
    cfg = dataclasses.replace(
        cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name))
                for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))})
    seen: list[tuple[str, str]] = []  # (path as given, today's path) of earlier overrides
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        given, text = item.split("=", 1)
        given = given.strip()
        # A field's path before it moved (model.topk, recipe.l1.kind, ...) sets it where it is.
        path = moved_path(given)
        for earlier_given, earlier in seen:
            root = _moved_root(given) or _moved_root(earlier_given)
            if root is None or _spelling(given) == _spelling(earlier_given):
                continue
            if all(p == root or p.startswith(root + ".") for p in (path, earlier)):
                raise ConfigError(
                    f"--set {earlier_given} and --set {given} set the same field, {root}, by two "
                    f"names (one from before it moved to the sparsity section); give it once, "
                    f"as {root}")
        seen.append((given, path))
        cfg = _set_path(cfg, path, path.split("."), text)
    return cfg


def _moved_root(given: str) -> str | None:
    """Today's path of the moved field that ``given`` names by its old path (or a part of)."""
    for old, new in MOVED_FIELDS.items():
        if given == old or given.startswith(old + "."):
            return new
    return None


def _spelling(given: str) -> str:
    """The old path prefix a field was named by (``model.topk``, ``recipe.l1``), or today's."""
    for old in MOVED_FIELDS:
        if given == old or given.startswith(old + "."):
            return old
    return "today"


def _set_path(target: Any, path: str, parts: list[str], text: str, depth: int = 0) -> Any:
    """``target`` with the field at ``parts[depth:]`` set from ``text``, rebuilt with
    ``dataclasses.replace`` along the path (nested sections such as the sparsity section's frozen
    Schedules are values, not mutated in place)."""
    part = parts[depth]
    names = [f.name for f in dataclasses.fields(target)]
    if part not in names:
        where = ".".join(parts[:depth]) or "config"
        raise ConfigError(f"unknown field {path!r}: {where} has fields {names}")
    current = getattr(target, part)
    if depth == len(parts) - 1:
        if isinstance(current, Schedule):
            # A number sets a constant schedule (a static value: sparsity.topk=0.25).
            value = _parse_value(path, text, "float")
            return dataclasses.replace(target, **{part: Schedule("constant", (value,))})
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"{path!r} is a section; set one of its fields")
        field = next(f for f in dataclasses.fields(target) if f.name == part)
        value = _parse_value(path, text, field.type)
    else:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])!r} is not a section")
        value = _set_path(current, path, parts, text, depth + 1)
    return dataclasses.replace(target, **{part: value})


def _where(err: BaseException, path: pathlib.Path) -> str:
    """'TypeError: message (line N)' with the line in ``path`` where it was raised."""
    import traceback

    lines = [f.lineno for f in traceback.extract_tb(err.__traceback__)
             if pathlib.Path(f.filename).resolve() == path.resolve()]
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}" + (f" (line {lines[-1]})" if lines else "")


def call_file_function(path: str | pathlib.Path, function: str, expected: type, error: type[Exception],
                       what: str):
    """Run ``function()`` of the Python file ``path`` (a config or sweep file) and check its type."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise error(f"{what} file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"sparsejax_{what}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise error(f"{what} file {str(path)!r} line {err.lineno}: SyntaxError: {err.msg}") from None
    except Exception as err:
        raise error(f"{what} file {str(path)!r} failed to load: {_where(err, path)}") from None
    if not hasattr(module, function):
        raise error(f"{what} file {str(path)!r} defines no {function}()")
    try:
        value = getattr(module, function)()
    except error:
        raise
    except Exception as err:
        raise error(f"{what} file {str(path)!r}: {function}() raised {_where(err, path)}") from None
    if not isinstance(value, expected):
        raise error(f"{path}: {function}() returned {type(value).__name__}, expected {expected.__name__}")
    return value


def read_file(path: str | pathlib.Path) -> Config:
    """``get_config()`` of a config file, not validated."""
    return call_file_function(path, "get_config", Config, ConfigError, "config")
