"""Stage latency and failures, exported through Ray Serve's metrics API (Prometheus).

On Ray's Prometheus export the names get Ray's `ray_` prefix:
`ray_lipserve_stage_latency_seconds_{bucket,sum,count}` and `ray_lipserve_stage_failures_total`,
each also tagged by Serve with deployment, replica and application.
"""
from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

LATENCY_METRIC = "lipserve_stage_latency_seconds"
FAILURES_METRIC = "lipserve_stage_failures_total"

# stages take from ~10 ms (a cached TTS line) to a minute (lip sync of a long clip on CPU)
LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0]


class StageMetrics:
    """One per replica (Ray registers a metric once per process and name)."""

    def __init__(self):
        self.latency = Histogram(LATENCY_METRIC, description="Seconds a lipserve stage took, per stage and engine.",
                                 boundaries=LATENCY_BOUNDARIES, tag_keys=("stage", "engine"))
        self.failures = Counter(FAILURES_METRIC, description="lipserve stage failures, per stage and error code.",
                                tag_keys=("stage", "code"))

    def observe(self, stage: str, engine: str, seconds: float) -> None:
        self.latency.observe(float(seconds), tags={"stage": stage, "engine": engine or "unknown"})

    def failed(self, stage: str, code: str) -> None:
        self.failures.inc(1.0, tags={"stage": stage, "code": code})


_metrics: StageMetrics | None = None


def stage_metrics() -> StageMetrics:
    global _metrics
    if _metrics is None:
        _metrics = StageMetrics()
    return _metrics
