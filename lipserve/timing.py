"""Stage timer: records seconds per stage (and start/end stamps) and prints the old server's table."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("lipserve.timing")


class StageTimer:
    def __init__(self, label: str = "lipserve"):
        self.label = label
        self.t0 = time.perf_counter()
        self.wall0 = time.time()
        self.step_times: dict[str, float] = {}
        self.spans: dict[str, tuple[float, float]] = {}  # stage -> (start, end), unix seconds

    @contextmanager
    def stage(self, name: str):
        start_wall, start = time.time(), time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start, start_wall)

    def add(self, name: str, seconds: float, start_wall: float | None = None) -> None:
        """Record a stage measured elsewhere (for example inside a remote replica)."""
        self.step_times[name] = self.step_times.get(name, 0.0) + float(seconds)
        if start_wall is not None:
            self.spans[name] = (start_wall, start_wall + float(seconds))

    def total(self) -> float:
        return time.perf_counter() - self.t0

    def finish(self) -> dict[str, float]:
        out = dict(self.step_times)
        out["total"] = self.total()
        return out

    def table(self, step_times: dict[str, float] | None = None) -> str:
        st = step_times or self.finish()
        total = st.get("total") or sum(v for k, v in st.items() if k != "total") or 1e-9
        lines = ["=" * 60, f"Performance Analysis [{self.label}]:"]
        for i, (name, sec) in enumerate((k, v) for k, v in st.items() if k != "total"):
            lines.append(f"  {i + 1}. {name + ':':<22}{sec:7.2f}s ({100 * sec / total:5.1f}%)")
        lines.append(f"  {'Total:':<25}{total:7.2f}s (100.0%)")
        lines.append("=" * 60)
        return "\n".join(lines)

    def log_table(self, step_times: dict[str, float] | None = None) -> None:
        log.info("\n%s", self.table(step_times))
