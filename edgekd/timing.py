"""Where a stage's time goes: seconds per named phase, summed over repeats (benchmarks/study_speed.py reads them
from each bundle's manifest). Below every stage, like records: export, its quantizer and its evaluator share one."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def to_dict(self) -> dict[str, float]:
        return {phase: round(s, 3) for phase, s in self.seconds.items()}
