"""Traces and access logs of one sidecar (issue #7): settings, the tracer and the access-log writer.

Settings come from flags (`-otlp-endpoint`, `-trace-sample-ratio`, `-access-log`) or, for a managed
proxy started without them, from its registration's `Proxy.Config` (`otlp_endpoint`,
`trace_sample_ratio`, `access_log`); a flag wins over the registration. Read at startup.

Per hop the sidecar records (lictor.tracing): on the inbound listener of an http destination a SERVER
span `inbound <service>` per request, after the intention decision, whose context is what the app
receives; on an http upstream one CLIENT span `outbound <upstream>` per attempt, whose context is
what the destination's sidecar receives. An unsampled request that is not access-logged only gets its
context passed on under a fresh span id (no Span, no bookkeeping). With an access log every request
appends one tuple (`lictor.accesslog.FIELDS`); a background thread encodes and writes the lines.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lictor.accesslog import AccessLog
from lictor.tracing import OtlpExporter, Tracer

__all__ = ["ObserveSettings", "Observer", "settings_from_config"]

log = logging.getLogger("lictor.proxy.observe")


@dataclass(frozen=True, slots=True)
class ObserveSettings:
    otlp_endpoint: str = ""  # "" = no tracing
    trace_sample_ratio: float = 1.0  # for traces this proxy starts; a caller's sampled flag wins
    access_log: str = ""  # "" = off, "-" = stdout, else a file

    def merged(self, otlp_endpoint: str | None, trace_sample_ratio: float | None,
               access_log: str | None) -> ObserveSettings:
        """Flags (not None) over these (the registration's)."""
        return ObserveSettings(self.otlp_endpoint if otlp_endpoint is None else otlp_endpoint,
                               self.trace_sample_ratio if trace_sample_ratio is None else trace_sample_ratio,
                               self.access_log if access_log is None else access_log)


def settings_from_config(config: Mapping[str, Any] | None) -> ObserveSettings:
    """`Proxy.Config` keys `otlp_endpoint`, `trace_sample_ratio`, `access_log` (bad values: off / 1.0)."""
    cfg = config if isinstance(config, Mapping) else {}
    ratio = cfg.get("trace_sample_ratio", 1.0)
    try:
        ratio = min(max(float(ratio), 0.0), 1.0)
    except (TypeError, ValueError):
        log.warning("Proxy.Config trace_sample_ratio %r is not a number; using 1.0", ratio)
        ratio = 1.0
    endpoint = cfg.get("otlp_endpoint") or ""
    access = cfg.get("access_log") or ""
    return ObserveSettings(str(endpoint) if isinstance(endpoint, str) else "", ratio,
                           str(access) if isinstance(access, str) else "")


class Observer:
    """The sidecar's tracer (None when tracing is off) and access log (None when off)."""

    def __init__(self, service: str, settings: ObserveSettings) -> None:
        self.service = service
        self.settings = settings
        self.tracer: Tracer | None = None
        if settings.otlp_endpoint:
            self.tracer = Tracer(service, OtlpExporter(settings.otlp_endpoint), settings.trace_sample_ratio)
        self.access_log = AccessLog(settings.access_log) if settings.access_log else None

    @property
    def active(self) -> bool:
        return self.tracer is not None or self.access_log is not None

    def describe(self) -> str:
        s = self.settings
        parts = [f"traces to {s.otlp_endpoint} (ratio {s.trace_sample_ratio:g})" if self.tracer else "no traces",
                 f"access log {s.access_log}" if self.access_log else "no access log"]
        return ", ".join(parts)

    def close(self, timeout: float = 2.0) -> None:
        if self.tracer is not None:
            self.tracer.close(timeout)
        if self.access_log is not None:
            self.access_log.close(timeout)

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        exporter = self.tracer.exporter if self.tracer is not None else None
        if isinstance(exporter, OtlpExporter):
            out.update(spans_exported=exporter.sent, spans_dropped=exporter.dropped + exporter.failed)
        if self.access_log is not None:
            out.update(access_log_lines=self.access_log.sent,
                       access_log_dropped=self.access_log.dropped + self.access_log.failed)
        return out
