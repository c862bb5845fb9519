"""Progress reporting: a live bar on a terminal, a few quiet lines in logs (Slurm, CI).

    with Progress(total=n_slices, unit="slices", desc="convert", bytes_per_unit=V * X * 2) as bar:
        bar.update(k)
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int | None, unit: str = "it", desc: str = "", bytes_per_unit: int = 0,
                 stream: TextIO | None = None, enabled: bool = True, log_every_s: float = 30.0):
        self.total, self.unit, self.desc = total, unit, desc
        self.bytes_per_unit = bytes_per_unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every_s = log_every_s
        self.n = 0
        self.t0 = self._last = time.perf_counter()
        self._postfix = ""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, text: str) -> None:
        self._postfix = text

    def _line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.n / dt
        parts = [self.desc] if self.desc else []
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = ("#" * int(frac * 24)).ljust(24, ".") if self.tty else ""
            parts.append(f"{bar} {self.n}/{self.total} {self.unit} ({100 * frac:.0f}%)".strip())
        else:
            parts.append(f"{self.n} {self.unit}")
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.bytes_per_unit:
            parts.append(f"{rate * self.bytes_per_unit / 1e6:.1f} MB/s")
        if self._postfix:
            parts.append(self._postfix)
        return " | ".join(parts)

    def update(self, k: int = 1) -> None:
        self.n += k
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty and now - self._last > 0.1:
            self.stream.write("\r" + self._line()[:160].ljust(100))
            self.stream.flush()
            self._last = now
        elif not self.tty and now - self._last > self.log_every_s:
            print(self._line(), file=self.stream, flush=True)
            self._last = now

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self._line()[:160].ljust(100) + "\n")
        else:
            print(self._line(), file=self.stream)
        self.stream.flush()
        self.enabled = False
