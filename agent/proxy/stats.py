"""Counters and gauges the proxy exposes on its metrics port (Prometheus text and JSON)."""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ["Stats"]


class Stats:
    """Plain counters keyed by (name, labels); cheap enough to bump on the hot path."""

    def __init__(self) -> None:
        self.counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, name: str, n: int = 1, **labels: str) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] += n

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges[(name, tuple(sorted(labels.items())))] = value

    def get(self, name: str, **labels: str) -> int:
        return self.counters.get((name, tuple(sorted(labels.items()))), 0)

    def prometheus(self) -> str:
        lines: list[str] = []
        for kind, items in (("counter", self.counters.items()), ("gauge", self.gauges.items())):
            seen: set[str] = set()
            for (name, labels), value in sorted(items):
                metric = f"lictor_proxy_{name}"
                if metric not in seen:
                    seen.add(metric)
                    lines.append(f"# TYPE {metric} {kind}")
                lab = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{metric}{{{lab}}} {value}" if lab else f"{metric} {value}")
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (name, labels), value in sorted(self.counters.items()):
            key = name + ("{" + ",".join(f"{k}={v}" for k, v in labels) + "}" if labels else "")
            out[key] = value
        return out
