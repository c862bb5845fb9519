"""Progress reporting: a live bar on a terminal, a few quiet lines in logs (Slurm, CI).

    with Progress(total=n_slices, unit="slices", desc="convert", bytes_per_unit=V * X * 2) as bar:
        bar.update(k)

A line shows the rate and, with a total, the time left (ETA) from the units done in this process
(``initial`` units done before it, e.g. by the attempt a resumed run continues, count towards the
total but not the rate). The postfix may be a callable: it is evaluated only when a line is drawn,
so a value that costs something to read (a loss on the GPU) is read when shown, and is current.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(max(seconds, 0) + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    def __init__(self, total: int | None, unit: str = "it", desc: str = "", bytes_per_unit: int = 0,
                 stream: TextIO | None = None, enabled: bool = True, log_every_s: float = 30.0,
                 initial: int = 0, keep: bool = True):
        self.total, self.unit, self.desc = total, unit, desc
        self.bytes_per_unit = bytes_per_unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every_s = log_every_s
        self.keep = keep  # False: close() erases the bar (tty) and prints no final line (logs)
        self.n = self.start = initial
        self.t0 = self._last = time.perf_counter()
        self._postfix: str | Callable[[], str] = ""
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, text: str | Callable[[], str]) -> None:
        self._postfix = text

    def _line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = (self.n - self.start) / dt
        parts = [self.desc] if self.desc else []
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = ("#" * int(frac * 24)).ljust(24, ".") if self.tty else ""
            parts.append(f"{bar} {self.n}/{self.total} {self.unit} ({100 * frac:.0f}%)".strip())
        else:
            parts.append(f"{self.n} {self.unit}")
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total and self.n < self.total and rate > 0:
            parts.append(f"ETA {duration((self.total - self.n) / rate)}")
        if self.bytes_per_unit:
            parts.append(f"{rate * self.bytes_per_unit / 1e6:.1f} MB/s")
        postfix = self._postfix() if callable(self._postfix) else self._postfix
        if postfix:
            parts.append(postfix)
        return " | ".join(parts)

    def update(self, k: int = 1) -> None:
        self.n += k
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty and now - self._last > 0.1:
            self.stream.write("\r" + self._line()[:160].ljust(100))
            self.stream.flush()
            self._last, self._drawn = now, True
        elif not self.tty and now - self._last > self.log_every_s:
            print(self._line(), file=self.stream, flush=True)
            self._last = now

    def clear(self) -> None:
        """Erase a drawn terminal bar, so that a message can take the line (it is drawn again at the
        next update)."""
        if self.tty and self._drawn:
            self.stream.write("\r" + " " * 160 + "\r")
            self.stream.flush()
            self._drawn = False

    def close(self) -> None:
        if not self.enabled:
            return
        if not self.keep:
            self.clear()
        elif self.tty:
            self.stream.write("\r" + self._line()[:160].ljust(100) + "\n")
        else:
            print(self._line(), file=self.stream)
        self.stream.flush()
        self.enabled = False
