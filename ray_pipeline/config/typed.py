"""Typed values from plain data: the parsers of the config's values and the construction of its
frozen dataclasses from dicts (YAML, the command line), with one error style throughout.

Every bad value raises :class:`ConfigError` naming the field, the value and what is allowed,
as scikit-learn's ``_parameter_constraints`` do.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Literal, Optional, Union

from ..errors import ConfigError

Budget = Union[int, float, str]
KValue = Union[int, str]


def fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config field {name!r} is {value!r}; allowed: {allowed}")


def no_credentials_in(name: str, uri: Optional[str]) -> None:
    """A location such as ``s3://KEY:SECRET@bucket/x`` would put a secret in run.json, logs and the
    report: refuse it, naming the field but never echoing the secret."""
    if not uri or "://" not in uri:
        return
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.username is not None or parts.password is not None:
        redacted = f"{parts.scheme}://***@{parts.hostname or ''}{parts.path}"
        raise ConfigError(f"config field {name!r} ({redacted}) carries credentials in the URI; give them "
                          f"through the environment instead (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                          f"GOOGLE_APPLICATION_CREDENTIALS), which this tool never writes anywhere")


# A branch or tag name as git allows it (no spaces, "..", "//", "@{", no trailing "/", "." or ".lock"),
# which a 40-hex commit id also is.
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")


def check_revision(name: str, revision: Optional[str]) -> None:
    """A Hugging Face Hub revision: empty (the default branch), or a branch, tag or 40-hex commit."""
    if revision is None:
        return
    if (not _REVISION.fullmatch(revision) or ".." in revision or "//" in revision
            or revision.endswith(("/", ".", ".lock"))):
        fail(name, revision, "empty (the model's default branch), or a branch, tag or 40-hex commit id of the Hub "
                             "model, e.g. 'main', 'v1.0', 'refs/pr/1'")


def check_template(name: str, template: str) -> None:
    """A ``str.format`` template over named record fields: it must parse, name its fields (no
    ``{}``, ``{0}``, ``{a.b}`` or ``{a[0]}``) and format strings with its conversions and specs."""
    import string

    allowed = "a format string over named fields, e.g. '{instruction}\\n{input}' (braces doubled as {{ }})"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        fail(name, template, f"{allowed}; it does not parse: {e}")
    if not fields:
        fail(name, template, allowed)
    bad = [f for f in fields if not f.isidentifier()]
    if bad:
        fail(name, template, f"{allowed}; {bad[0]!r} is not a plain field name")
    try:
        template.format(**{f: "x" for f in fields})
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        fail(name, template, f"{allowed}; it does not format: {e}")


def parse_k(name: str, value: KValue) -> tuple[str, float]:
    """``("abs", K)`` for an int >= 1, ``("ratio", r)`` for ``"M"``, ``"M/4"`` or ``"0.5M"`` (K = r M)."""
    allowed = "an int >= 1, or a ratio of the budget: 'M', 'M/2', 'M/4', '0.5M'"
    if isinstance(value, bool):
        fail(name, value, allowed)
    if isinstance(value, int):
        if value < 1:
            fail(name, value, allowed)
        return ("abs", float(value))
    if isinstance(value, str):
        text = value.replace(" ", "").upper()
        try:
            if text == "M":
                r = 1.0
            elif text.startswith("M/"):
                r = 1.0 / float(text[2:])
            elif text.endswith("M"):
                r = float(text[:-1].rstrip("*"))
            else:
                r = -1.0
        except (ValueError, ZeroDivisionError):
            r = -1.0
        if r <= 0:
            fail(name, value, allowed)
        return ("ratio", r)
    fail(name, value, allowed)
    raise AssertionError  # unreachable


def parse_budget(name: str, value: Budget) -> Union[int, float]:
    """An absolute count (int >= 1) or a fraction of the pool (float in (0, 1], or 'P%')."""
    if isinstance(value, bool):
        fail(name, value, "a sample count (int >= 1), a fraction in (0, 1], or a percentage like '1%'")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            fail(name, value, "a sample count (int >= 1), a fraction in (0, 1], or a percentage like '1%'")
        if value.is_integer() and value > 1:
            value = int(value)
    if isinstance(value, int):
        if value < 1:
            fail(name, value, "a sample count >= 1 (or a fraction in (0, 1])")
        return value
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            fail(name, value, "a fraction in (0, 1] of the pool (or an int count >= 1)")
        return value
    fail(name, value, "a sample count (int >= 1), a fraction in (0, 1], or a percentage like '1%'")
    raise AssertionError  # unreachable


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, "
                          f"not {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]}; "
                          f"allowed in {prefix.rstrip('.') or 'the top level'}: {sorted(names)}")
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()}
    return cls(**kwargs)


YAML11_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, name + ".")
    if origin is Union:
        if value is None and type(None) in args:
            return None
        scalars = tuple(a for a in args if a in (int, float, str))
        if len(scalars) > 1 and len(scalars) == len([a for a in args if a is not type(None)]):
            if isinstance(value, scalars) and not isinstance(value, bool):
                return value
            fail(name, value, " or ".join(a.__name__ for a in scalars))
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0] if len(inner) == 1 else Union[tuple(inner)], value, name)
    if origin is Literal:
        if value not in args:
            fail(name, value, " | ".join(repr(a) for a in args))
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            fail(name, value, "a mapping of names to values")
        return dict(value)
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # a scalar where a list is expected: a list of one
        if not isinstance(value, (list, tuple)):
            fail(name, value, f"a list of {getattr(args[0], '__name__', args[0])}")
        return tuple(_coerce(args[0], v, name) for v in value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            fail(name, value, "an int")
        return value
    if tp is float:
        if isinstance(value, str) and YAML11_EXPONENT.match(value.strip()):
            return float(value)  # 1e-4: YAML 1.1 (PyYAML) reads an exponent without a dot as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(name, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(name, value, "a string")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail(name, value, "true or false")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {name}")  # a bug in this module
