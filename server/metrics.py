"""Prometheus metrics. Only public quantities (SPEC §3); every series is listed, with its type,
labels and why it is public, in ``server/METRICS.md`` (a test checks the two agree).

Timings are observed only for stages whose duration depends on public inputs alone: image
generation (steps, images, model; it starts after the release) and the ledger's commits (the
ledger holds budgets and spends, which are public). Never: per-query retrieval or whole-request
timings of ``Retrieve``/``Generate``, survivor counts, distances, neighbour ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from dprdm.ledger.api import BudgetState, Ledger

__all__ = ["Metrics", "InstrumentedLedger", "LEDGER_COMMITS", "TIMED_STAGES"]

LEDGER_COMMITS = ("reserve", "store_release", "create_budget")
"""Ledger operations that commit (their duration is observed in ``dprdm_ledger_commit_seconds``)."""
TIMED_STAGES = ("dprdm_generation_seconds", "dprdm_ledger_commit_seconds")
"""The only histograms: stages whose duration depends on public inputs alone (SPEC §3)."""
_GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
_LEDGER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """A private registry (several servers may live in one process, e.g. in tests)."""

    def __init__(self) -> None:
        self._http: tuple[Any, Any] | None = None  # the exporter (server, thread) once serving
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_* (CPU, memory, file descriptors, start time)
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*
        self.requests = Counter(
            "dprdm_requests", "Requests by method and status code", ["method", "code"], registry=r
        )
        self.bad_requests = Counter(
            "dprdm_bad_requests",
            "Requests whose message could not be decoded (e.g. invalid UTF-8), by method and field",
            ["method", "field"],
            registry=r,
        )
        self.budget = Gauge("dprdm_budget_epsilon", "Budget epsilon of a privacy domain", ["domain"], registry=r)
        self.spent = Gauge(
            "dprdm_budget_epsilon_spent", "Epsilon spent on a privacy domain (informational)", ["domain"], registry=r
        )
        self.generation_inside = Gauge(
            "dprdm_generation_inside", "Generation requests queued or running", registry=r
        )
        self.generation_seconds = Histogram(
            "dprdm_generation_seconds",
            "Time a generation worker spends making one request's images (after the release)",
            buckets=_GENERATION_BUCKETS,
            registry=r,
        )
        self.ledger_seconds = Histogram(
            "dprdm_ledger_commit_seconds",
            "Duration of a committing ledger operation",
            ["operation"],
            buckets=_LEDGER_BUCKETS,
            registry=r,
        )
        self.ledger_errors = Counter(
            "dprdm_ledger_errors",
            "Ledger operations that raised, by operation and error class (refusals included)",
            ["operation", "error"],
            registry=r,
        )

    def request(self, method: str, code: str) -> None:
        """Count one finished request."""
        self.requests.labels(method=method, code=code).inc()

    def bad_request(self, method: str, field: str) -> None:
        """Count one undecodable request (its final code is counted by :meth:`request`)."""
        self.bad_requests.labels(method=method, field=field).inc()

    def budget_state(self, state: BudgetState) -> None:
        """Publish a domain's budget and spent epsilon."""
        self.budget.labels(domain=state.domain).set(float(state.budget.epsilon))
        self.spent.labels(domain=state.domain).set(float(state.epsilon_spent))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP exporter; returns the bound port (:meth:`close` stops it)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP exporter (if started) and release its port; idempotent."""
        http, self._http = self._http, None
        if http is not None:
            server, thread = http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5.0)


class InstrumentedLedger:
    """A ledger proxy: times the committing operations and counts every operation's errors.

    Everything else is delegated unchanged (the wrapped ledger keeps its own contract).
    """

    def __init__(self, ledger: Ledger, metrics: Metrics) -> None:
        self._ledger, self._metrics = ledger, metrics

    @property
    def wrapped(self) -> Ledger:
        """The ledger behind the proxy."""
        return self._ledger

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._ledger, name)
        if name.startswith("_") or not callable(attr):
            return attr
        return _instrumented(attr, name, self._metrics)


def _instrumented(fn: Callable[..., Any], name: str, metrics: Metrics) -> Callable[..., Any]:
    timed = name in LEDGER_COMMITS

    def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:
            metrics.ledger_errors.labels(operation=name, error=type(exc).__name__).inc()
            raise
        if timed:
            metrics.ledger_seconds.labels(operation=name).observe(time.perf_counter() - start)
        return out

    return call
