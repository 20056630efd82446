"""Prometheus metrics. Only public quantities (SPEC §3):

* ``dprdm_requests_total{method, code}``: requests by method and final status code;
* ``dprdm_budget_epsilon{domain}`` / ``dprdm_budget_epsilon_spent{domain}``: budgets (the spent
  figure depends only on admitted profiles, which are public);
* ``dprdm_generation_inside``: requests queued or running in the generation pool.

Never: per-query retrieval or request timings, survivor counts, distances, neighbour ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from dprdm.ledger.api import BudgetState

__all__ = ["Metrics"]


class Metrics:
    """A private registry (several servers may live in one process, e.g. in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dprdm_requests", "Requests by method and status code", ["method", "code"], registry=self.registry
        )
        self.budget = Gauge(
            "dprdm_budget_epsilon", "Budget epsilon of a privacy domain", ["domain"], registry=self.registry
        )
        self.spent = Gauge(
            "dprdm_budget_epsilon_spent",
            "Epsilon spent on a privacy domain (informational)",
            ["domain"],
            registry=self.registry,
        )
        self.generation_inside = Gauge(
            "dprdm_generation_inside", "Generation requests queued or running", registry=self.registry
        )

    def request(self, method: str, code: str) -> None:
        """Count one finished request."""
        self.requests.labels(method=method, code=code).inc()

    def budget_state(self, state: BudgetState) -> None:
        """Publish a domain's budget and spent epsilon."""
        self.budget.labels(domain=state.domain).set(float(state.budget.epsilon))
        self.spent.labels(domain=state.domain).set(float(state.epsilon_spent))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP exporter; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
