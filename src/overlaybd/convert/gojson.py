"""JSON read and written as Go's ``encoding/json`` does it for a struct type (pure): the bytes a Go program (the
reference convertor) produces when it unmarshals a document into a struct and marshals it back.

Reading (``decode``): keys match struct fields exactly or ignoring ASCII case (and the two non-ASCII letters Go
folds into ASCII, the Kelvin sign and the long s); unknown keys are dropped; ``null`` leaves a field as it was; a
repeated key decodes again into what the earlier one made (a map or struct merges, a list or scalar is replaced);
a value of the wrong type is an error, as it is for Go.

Writing (``encode``): fields in struct order, ``omitempty`` fields left out when empty (``""``, 0, false, an empty
or nil list or map, a nil pointer; a struct never), map keys sorted, no spaces, and strings escaped as Go escapes
them: ``<``, ``>``, ``&``, U+2028 and U+2029 as ``\\u003c`` and so on, control characters as ``\\n``, ``\\r``,
``\\t``, ``\\b``, ``\\f`` or ``\\u00XX`` (Go 1.22 and later), invalid UTF-8 as U+FFFD.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import FormatError

# value kinds
STRING, INT, BOOL, TIME, STRINGS, STR_MAP, SET_MAP, BYTES = "string", "int", "bool", "time", "strings", "str_map", \
    "set_map", "bytes"


@dataclass(frozen=True)
class Field:
    key: str  # the JSON key (the struct tag)
    kind: str | Struct  # a kind above, or a nested struct
    omitempty: bool = False
    pointer: bool = False  # a *T: null decodes to nil, nil is omitted with omitempty
    many: bool = False  # a []T of structs


@dataclass(frozen=True)
class Struct:
    name: str
    fields: tuple[Field, ...]


class GoTime:
    """A time as Go keeps it after parsing RFC 3339: the instant with its zone offset, and nanoseconds."""

    __slots__ = ("stamp", "nanos", "offset")

    def __init__(self, stamp: datetime, nanos: int, offset: int) -> None:
        self.stamp, self.nanos, self.offset = stamp, nanos, offset

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GoTime) and (self.stamp, self.nanos, self.offset) == \
            (other.stamp, other.nanos, other.offset)

    def __hash__(self) -> int:
        return hash((self.stamp, self.nanos, self.offset))

    def format(self) -> str:
        """RFC 3339 with nanoseconds, trailing zeros trimmed, as Go's ``time.RFC3339Nano``."""
        s = self.stamp
        out = f"{s.year:04d}-{s.month:02d}-{s.day:02d}T{s.hour:02d}:{s.minute:02d}:{s.second:02d}"
        if self.nanos:
            out += "." + f"{self.nanos:09d}".rstrip("0")
        if self.offset == 0:
            return out + "Z"
        sign = "+" if self.offset > 0 else "-"
        minutes = abs(self.offset) // 60
        return out + f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})\Z")


def parse_time(text: str, where: str) -> GoTime:
    m = _RFC3339.match(text)
    if m is None:
        raise FormatError(f"{where}: {text!r} is not an RFC 3339 time")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac, zone = m.group(7), m.group(8)
    if hour > 23 or minute > 59 or second > 59:
        raise FormatError(f"{where}: {text!r} is not an RFC 3339 time")
    try:
        stamp = datetime(year, month, day, hour, minute, second)
    except ValueError:
        raise FormatError(f"{where}: {text!r} is not an RFC 3339 time") from None
    nanos = int((frac or "0")[:9].ljust(9, "0"))
    if zone == "Z":
        offset = 0
    else:
        zh, zm = int(zone[1:3]), int(zone[4:6])
        if zh > 23 or zm > 59:
            raise FormatError(f"{where}: {text!r} has a bad zone offset")
        offset = (zh * 3600 + zm * 60) * (1 if zone[0] == "+" else -1)
    return GoTime(stamp, nanos, offset)


def _fold(key: str) -> str:
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else "k" if c == "\u212a" else "s" if c == "\u017f" else c
                   for c in key)


def _surrogates_fixed(text: str) -> str:
    """Lone surrogates (from ``\\ud800`` escapes) become U+FFFD, as Go's decoder makes them."""
    if not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


class _Object:
    """A JSON object as its key/value pairs in document order (repeated keys kept)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self.pairs)


def _per_byte(exc: UnicodeError) -> tuple[str, int]:
    """Each byte of invalid UTF-8 becomes one U+FFFD, as Go decodes it."""
    assert isinstance(exc, UnicodeDecodeError)
    return "\ufffd", exc.start + 1


codecs.register_error("overlaybd-go-utf8", _per_byte)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(raw: bytes, where: str) -> Any:
    """Parse JSON keeping repeated keys (objects as ``_Object``)."""
    try:
        text = raw.decode("utf-8", errors="overlaybd-go-utf8")
        return json.loads(text, object_pairs_hook=_Object, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{where}: not valid JSON: {exc}") from None


def decode(struct: Struct, raw: bytes, where: str) -> dict[str, Any]:
    """Unmarshal a document into ``struct`` (values keyed by JSON key)."""
    value = loads(raw, where)
    if not isinstance(value, _Object):
        raise FormatError(f"{where}: expected a JSON object for {struct.name}")
    return _decode_struct(struct, value, {}, where)


def _decode_struct(struct: Struct, obj: _Object, into: dict[str, Any], where: str) -> dict[str, Any]:
    exact = {f.key: f for f in struct.fields}
    folded: dict[str, Field] = {}
    for f in struct.fields:
        folded.setdefault(_fold(f.key), f)
    out = dict(into)
    for key, value in obj:
        key = _surrogates_fixed(key)
        found = exact.get(key) or folded.get(_fold(key))
        if found is None:
            continue
        out[found.key] = _decode_field(found, value, out.get(found.key), f"{where}.{found.key}")
    return out


def _type_error(where: str, value: Any, want: str) -> FormatError:
    got = "null" if value is None else "object" if isinstance(value, _Object) else type(value).__name__
    return FormatError(f"{where}: cannot read a JSON {got} as {want}")


def _decode_field(f: Field, value: Any, current: Any, where: str) -> Any:
    if value is None:
        return None if f.pointer or f.many or f.kind in (STRINGS, STR_MAP, SET_MAP, BYTES) else current
    kind = f.kind
    if isinstance(kind, Struct):
        return _decode_structs(kind, value, where) if f.many else _decode_one_struct(kind, value, current, where)
    if kind in (STR_MAP, SET_MAP):
        return _decode_map(kind, value, current, where)
    return _SCALARS[kind](value, where)


def _decode_one_struct(kind: Struct, value: Any, current: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, _Object):
        raise _type_error(where, value, kind.name)
    return _decode_struct(kind, value, current or {}, where)


def _decode_structs(kind: Struct, value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _type_error(where, value, f"a list of {kind.name}")
    structs: list[dict[str, Any]] = []
    for n, item in enumerate(value):
        if item is None:
            structs.append({})
        elif isinstance(item, _Object):
            structs.append(_decode_struct(kind, item, {}, f"{where}[{n}]"))
        else:
            raise _type_error(f"{where}[{n}]", item, kind.name)
    return structs


def _decode_map(kind: str, value: Any, current: Any, where: str) -> dict[str, Any]:
    """A ``map[string]string`` (STR_MAP) or ``map[string]struct{}`` (SET_MAP), merged into what was there, as Go
    merges into an existing map."""
    if not isinstance(value, _Object):
        raise _type_error(where, value, "an object")
    out = dict(current or {})
    for key, item in value:
        key = _surrogates_fixed(key)
        if kind == STR_MAP:
            if item is not None and not isinstance(item, str):
                raise _type_error(f"{where}[{key!r}]", item, "a string")
            out[key] = _surrogates_fixed(item) if item is not None else out.get(key, "")
        else:
            if item is not None and not isinstance(item, _Object):
                raise _type_error(f"{where}[{key!r}]", item, "an object")
            out[key] = {}
    return out


def _decode_string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _type_error(where, value, "a string")
    return _surrogates_fixed(value)


def _decode_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise _type_error(where, value, "an integer")
    return value


def _decode_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(where, value, "true or false")
    return value


def _decode_time(value: Any, where: str) -> GoTime:
    if not isinstance(value, str):
        raise _type_error(where, value, "a time")
    return parse_time(value, where)


def _decode_bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise _type_error(where, value, "base64 data")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{where}: not base64 data") from None


def _decode_strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise _type_error(where, value, "a list of strings")
    items: list[str] = []
    for n, item in enumerate(value):
        if item is not None and not isinstance(item, str):
            raise _type_error(f"{where}[{n}]", item, "a string")
        items.append(_surrogates_fixed(item or ""))
    return items


_SCALARS: dict[str, Callable[[Any, str], Any]] = {
    STRING: _decode_string, INT: _decode_int, BOOL: _decode_bool, TIME: _decode_time, BYTES: _decode_bytes,
    STRINGS: _decode_strings,
}


def _empty(value: Any) -> bool:
    return value is None or value == "" or value is False or (isinstance(value, int) and value == 0) or \
        (isinstance(value, (list, dict, bytes)) and len(value) == 0)


def to_plain(struct: Struct, values: dict[str, Any]) -> dict[str, Any]:
    """The struct as an ordered dict ready for ``dumps``: struct order, omitempty applied, maps sorted, zero values
    for fields never set (as a Go struct has them)."""
    out: dict[str, Any] = {}
    for f in struct.fields:
        value = values.get(f.key)
        kind = f.kind
        if isinstance(kind, Struct):
            if f.many:
                if value is None:
                    if f.omitempty:
                        continue
                    out[f.key] = None
                    continue
                if f.omitempty and not value:
                    continue
                out[f.key] = [to_plain(kind, v) for v in value]
                continue
            if value is None and f.pointer:
                if not f.omitempty:
                    out[f.key] = None
                continue
            out[f.key] = to_plain(kind, value or {})
            continue
        if f.omitempty and _empty(value):
            continue
        out[f.key] = _plain_value(kind, value)
    return out


def _plain_value(kind: str, value: Any) -> Any:
    if value is None:
        return {STRING: "", INT: 0, BOOL: False}.get(kind)
    if kind == TIME:
        assert isinstance(value, GoTime)
        return value.format()
    if kind == BYTES:
        return base64.b64encode(value).decode()
    if kind in (STR_MAP, SET_MAP):
        return {k: value[k] for k in sorted(value, key=lambda s: s.encode("utf-8", "surrogatepass"))}
    return value


_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_ESCAPED = re.compile("[<>&\u2028\u2029]")


def dumps(value: Any) -> bytes:
    """Compact JSON with Go's escaping (see the module docstring)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return _GO_ESCAPED.sub(lambda m: _GO_ESCAPES[m.group()], text).encode("utf-8")


def encode(struct: Struct, values: dict[str, Any]) -> bytes:
    return dumps(to_plain(struct, values))
