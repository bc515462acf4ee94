"""Prometheus metrics of one server, in a registry of its own (two apps in one process never mix counts)."""

from __future__ import annotations

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STAGES = ("queue", "route", "generate", "total")  # the parts of a request's latency


class Metrics:
    """Requests by model, expert and status; latency histograms by stage; batch sizes; queue depth."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mole_requests", "chat-completion requests answered", ["model", "expert", "status"], registry=r
        )
        self.latency = Histogram(
            "mole_request_latency_seconds",
            "seconds per request, by stage (queue, route, generate, total)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mole_batch_size", "requests per engine batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("mole_queue_depth", "requests waiting for the engine", registry=r)
        self.in_flight = Gauge("mole_requests_in_flight", "requests being answered", registry=r)
        self.tokens = Counter("mole_tokens", "tokens processed", ["kind"], registry=r)
        self.fallbacks = Counter(
            "mole_fallbacks", "requests answered by the fallback (router below --min-probability)", registry=r
        )

    def observe_latency(self, timings: dict[str, float]) -> None:
        """Record a request's seconds per stage (stages missing from `timings` are skipped)."""
        for stage in STAGES:
            if timings.get(stage) is not None:
                self.latency.labels(stage).observe(timings[stage])

    def answered(self) -> dict[str, int]:
        """Requests answered so far: {"requests": all, "ok": status 200, "refused": 4xx, "failed": 5xx}."""
        out = {"requests": 0, "ok": 0, "refused": 0, "failed": 0}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if not sample.name.endswith("_total"):
                    continue
                n, status = int(sample.value), sample.labels["status"]
                out["requests"] += n
                key = "ok" if status == "200" else "refused" if status.startswith("4") else "failed"
                out[key] += n
        return out

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
