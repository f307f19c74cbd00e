"""Sample a function in a background thread (host memory during a guest run)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List, Optional


class Sampler:
    """Calls ``fn() -> dict`` every ``interval`` s in a thread; each sample
    gets ``t`` (seconds since ``t0``).  ``marks`` holds (t, label) events."""

    def __init__(self, fn: Callable[[], Dict[str, Any]], interval: float = 0.1,
                 t0: Optional[float] = None):
        self.fn = fn
        self.interval = interval
        self.t0 = t0 if t0 is not None else time.monotonic()
        self.samples: List[Dict[str, Any]] = []
        self.marks: List[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors: List[str] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, label: str, **extra: Any) -> float:
        t = self.now()
        self.marks.append({"t": round(t, 3), "label": label, **extra})
        return t

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            t = self.now()
            try:
                s = self.fn()
            except Exception as e:  # noqa: BLE001 - keep sampling
                self.errors.append(repr(e))
                s = {}
            s["t"] = round(t, 3)
            self.samples.append(s)
            nxt += self.interval
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> List[Dict[str, Any]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
