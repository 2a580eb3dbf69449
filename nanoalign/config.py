"""Configs: each script's dataclass built from `--key=value` arguments (never exec), `--help` from the comments
written beside the fields, and the range and choice checks every entry point runs before it writes anything."""

import dataclasses
import inspect
import math
import sys
import types
import typing
from pathlib import Path

from nanoalign.precision import DTYPES


def parse_config(cls, argv=None):
    """Build the dataclass `cls` from `--key=value` arguments, converting each value to its field's type.
    `None` is accepted for optional fields, `True`/`False` for booleans; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(config_help(cls))
        raise SystemExit(0)
    overrides = {}
    for arg in argv:
        key, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep:
            raise SystemExit(f"expected --key=value, got {arg!r}")
        if key not in fields:
            raise SystemExit(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
        overrides[key] = _convert(value, hints[key], key)
    return cls(**overrides)


def config_help(cls) -> str:
    """One line per field of the Config dataclass `cls`: --name=default, its type, and the comment written
    beside it in the source (the only documentation a flag has)."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and name.isidentifier() and "#" in rest:
            comments[name] = rest.split("#", 1)[1].strip()
    hints = typing.get_type_hints(cls)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # set under python -m: name the module, not a file
    program = f"-m {spec.name.removesuffix('.__main__')}" if spec is not None else Path(sys.argv[0]).name
    lines = [f"usage: python {program} [--key=value ...]; the flags, their defaults and types:"]
    for f in dataclasses.fields(cls):
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"  --{f.name}={f.default}  ({kind})  {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def _convert(value: str, hint, key: str):
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if value == "None":
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if value not in ("True", "False"):
                raise ValueError("expected True or False")
            return value == "True"
        return hint(value)
    except ValueError as e:
        raise SystemExit(f"--{key}={value}: cannot convert to {getattr(hint, '__name__', hint)} ({e})")


DEVICES = ("auto", "cpu", "cuda")


def check_config(cfg, positive: str = "", nonneg: str = "", choices: dict | None = None) -> None:
    """Refuse a bad config before anything is created or opened for writing: the fields named in `positive`
    (space-separated) must be > 0, those in `nonneg` >= 0 (None passes: "not set"), every float field finite
    (--lr=inf would pass "> 0" and write infinite weights), each field of `choices` one of its values, `device`
    (if any) one of DEVICES, `dtype` (if any) one of precision.DTYPES. The error names the flag and what it
    allows."""
    for names, test, rule in ((positive, lambda v: v > 0, "> 0"), (nonneg, lambda v: v >= 0, ">= 0")):
        for name in names.split():
            value = getattr(cfg, name)
            if value is not None and not test(value):  # NaN fails both tests
                raise SystemExit(f"--{name}={value}: must be {rule}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"--{f.name}={value}: must be a finite number")
    implied = {name: allowed for name, allowed in (("device", DEVICES), ("dtype", tuple(DTYPES)))
               if hasattr(cfg, name)}
    for name, allowed in {**implied, **(choices or {})}.items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name}={getattr(cfg, name)}: expected one of {', '.join(map(str, allowed))}")
