"""Counters and summaries in the Prometheus text format, for `GET /metrics`."""

from __future__ import annotations

import threading
from collections import defaultdict


def _escape(value: str) -> str:
    """The text format's escaping: a value can never end its line or its quotes."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._help: dict[str, str] = {}

    def inc(self, name: str, amount: float = 1.0, help: str = "", **labels: str) -> None:
        with self._lock:
            self._counters[name][_labels(labels)] += amount
            if help:
                self._help.setdefault(name, help)

    def observe(self, name: str, seconds: float, help: str = "", **labels: str) -> None:
        """A summary as two counters: total seconds and count."""
        self.inc(f"{name}_seconds_sum", seconds, help, **labels)
        self.inc(f"{name}_seconds_count", 1.0, help, **labels)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name in sorted(self._counters):
                if name in self._help:
                    lines.append(f"# HELP {name} {self._help[name]}")
                lines.append(f"# TYPE {name} counter")
                for labels, value in sorted(self._counters[name].items()):
                    lines.append(f"{name}{labels} {value:g}")
        return "\n".join(lines) + "\n"
