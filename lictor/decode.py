"""Decoding JSON request bodies the way Consul's Go decoder does.

Keys match case-insensitively (py-consul sends lowercase keys), some structs accept snake_case
aliases, and an unknown key is a 400 naming the key. Every decoded object comes back with the
canonical PascalCase keys, so the rest of the code never sees spelling variants.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lictor.errors import BadRequest, PayloadTooLarge

MAX_BODY_BYTES = 4 * 1024 * 1024


class Spec:
    go_type = "value"

    def decode(self, value: Any, path: str) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _mismatch(value: Any, path: str, go_type: str) -> BadRequest:
    return BadRequest(
        f"Request decode failed: json: cannot unmarshal {_type_name(value)} into field {path} of type {go_type}"
    )


class Str(Spec):
    go_type = "string"

    def decode(self, value: Any, path: str) -> Any:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise _mismatch(value, path, self.go_type)
        return value


class Int(Spec):
    go_type = "int"

    def decode(self, value: Any, path: str) -> Any:
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _mismatch(value, path, self.go_type)
        if isinstance(value, float):
            if not value.is_integer():
                raise _mismatch(value, path, self.go_type)
            value = int(value)
        if not -(2**63) <= value < 2**64:
            raise BadRequest(f"Request decode failed: json: number {value} overflows field {path}")
        return value


class Float(Spec):
    go_type = "float64"

    def decode(self, value: Any, path: str) -> Any:
        if value is None:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _mismatch(value, path, self.go_type)
        return float(value)


class Bool(Spec):
    go_type = "bool"

    def decode(self, value: Any, path: str) -> Any:
        if value is None:
            return False
        if not isinstance(value, bool):
            raise _mismatch(value, path, self.go_type)
        return value


class Duration(Spec):
    """A Go duration string or a number of nanoseconds; kept as given, validated later."""

    go_type = "time.Duration"

    def decode(self, value: Any, path: str) -> Any:
        if value is None:
            return ""
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _mismatch(value, path, self.go_type)
        return value


class AnyValue(Spec):
    def decode(self, value: Any, path: str) -> Any:
        return value


@dataclass
class ListOf(Spec):
    item: Spec

    @property
    def go_type(self) -> str:  # type: ignore[override]
        return f"[]{self.item.go_type}"

    def decode(self, value: Any, path: str) -> Any:
        if value is None:
            return []
        if not isinstance(value, list):
            raise _mismatch(value, path, self.go_type)
        return [self.item.decode(v, f"{path}[{i}]") for i, v in enumerate(value)]


@dataclass
class MapOf(Spec):
    item: Spec

    @property
    def go_type(self) -> str:  # type: ignore[override]
        return f"map[string]{self.item.go_type}"

    def decode(self, value: Any, path: str) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _mismatch(value, path, self.go_type)
        return {str(k): self.item.decode(v, f"{path}.{k}") for k, v in value.items()}


@dataclass
class Struct(Spec):
    """A JSON object with known fields. `aliases` maps extra spellings (snake_case) to fields."""

    name: str
    fields: dict[str, Spec]
    aliases: dict[str, str] = field(default_factory=dict)
    lenient: frozenset[str] = frozenset()  # keys accepted and dropped (e.g. "WriteRequest")

    def __post_init__(self) -> None:
        self._by_lower: dict[str, str] = {k.lower(): k for k in self.fields}
        for alias, target in self.aliases.items():
            self._by_lower[alias.lower()] = target
        self._lenient_lower = {k.lower() for k in self.lenient}

    @property
    def go_type(self) -> str:  # type: ignore[override]
        return self.name

    def decode(self, value: Any, path: str = "") -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _mismatch(value, path or self.name, self.name)
        out: dict[str, Any] = {}
        for key, item in value.items():
            canonical = self.fields.get(key) and key or self._by_lower.get(str(key).lower())
            if canonical is None:
                if str(key).lower() in self._lenient_lower:
                    continue
                raise BadRequest(f'Request decode failed: json: unknown field "{key}"')
            sub_path = f"{path}.{canonical}" if path else canonical
            out[canonical] = self.fields[canonical].decode(item, sub_path)
        return out


def parse_json_body(raw: bytes, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """Parse a request body, with a size limit and messages that say what is wrong."""
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"Request body too large: {len(raw)} bytes exceeds the limit of {max_bytes} bytes")
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"Request decode failed: body is not valid UTF-8 ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise BadRequest(f"Request decode failed: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise BadRequest("Request decode failed: JSON nested too deeply") from exc


def decode_body(raw: bytes, spec: Struct, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    data = parse_json_body(raw, max_bytes)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise BadRequest(f"Request decode failed: json: cannot unmarshal {_type_name(data)} into {spec.name}")
    return spec.decode(dict(data))


def check_name(value: str, what: str) -> None:
    """Reject names that cannot be safely stored or echoed: control characters, over-long."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise BadRequest(f"Invalid {what} {value!r}: must not contain control characters")
    if len(value) > 512:
        raise BadRequest(f"Invalid {what}: longer than 512 characters")
