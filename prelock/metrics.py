"""Prometheus metrics of the daemon, served over HTTP when metrics.listen is set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from prelock.errors import PrelockError
from prelock.plan import TIERS


class Metrics:
    def __init__(self, listen: str):
        host, _, port = listen.rpartition(":")
        self.registry = CollectorRegistry()
        self.locked_bytes = Gauge("prelock_locked_bytes", "Bytes of file pages the daemon holds locked.",
                                  ["tier"], registry=self.registry)
        self.held_files = Gauge("prelock_held_files", "Files the daemon holds locked.", ["tier"],
                                registry=self.registry)
        self.budget_bytes = Gauge("prelock_budget_bytes", "The lock budget in force.", registry=self.registry)
        self.skipped_files = Gauge("prelock_skipped_files", "Files skipped in the last cycle.",
                                   registry=self.registry)
        self.cycle_seconds = Gauge("prelock_cycle_duration_seconds", "Wall time of the last cycle.",
                                   registry=self.registry)
        self.cycles = Counter("prelock_cycles", "Cycles run since start.", registry=self.registry)
        try:
            start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
        except OSError as exc:
            raise PrelockError(f"cannot serve metrics on {listen}: {exc.strerror}: free the port or change "
                               "metrics.listen") from None

    def update(self, daemon) -> None:
        by_tier = daemon.locker.locked_bytes_by_tier()
        files_by_tier = {tier: 0 for tier in TIERS}
        for held in daemon.locker.held.values():
            files_by_tier[held.tier] = files_by_tier.get(held.tier, 0) + 1
        for tier in TIERS:
            self.locked_bytes.labels(tier).set(by_tier.get(tier, 0))
            self.held_files.labels(tier).set(files_by_tier[tier])
        last = daemon.last_summary
        if last is not None:
            self.budget_bytes.set(last.plan.budget_bytes)
            self.skipped_files.set(last.skipped)
            self.cycle_seconds.set(last.duration_s)
        self.cycles.inc()
