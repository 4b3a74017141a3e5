"""Progress of long work: a live bar on a terminal, readable timestamped lines in a log.

:func:`progress_bar` returns a tqdm bar when stderr is a terminal. When it is
not (a log file, CI, ``nohup``), tqdm's carriage-return redraws would make the
log unreadable, so it returns a :class:`LogProgress` instead: the same
``update`` / ``set_postfix_str`` / ``close`` calls, printed as one line every
``interval`` seconds (and at the end) with the count, rate and ETA::

    [12:03:41] teachers: 3/9 (33%), 0.08 it/s, ETA 75 s, cat

Only process 0 of a multi-process run shows progress (``jax.process_index()``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

LOG_INTERVAL_S = float(os.environ.get("NETTRANSPLANT_LOG_INTERVAL_S", "30"))


def _is_primary_process() -> bool:
    try:
        import jax
        return jax.process_index() == 0
    except Exception:  # noqa: BLE001 - before the runtime is up, this process shows progress
        return True


class LogProgress:
    """A progress report for non-terminal output: one line per ``interval`` seconds."""

    def __init__(self, total: int | None, desc: str, *, interval: float = LOG_INTERVAL_S,
                 stream: TextIO | None = None, disable: bool = False, leave: bool = True):
        self.total, self.desc, self.interval = total, desc, interval
        self.stream = stream or sys.stderr
        self.disable, self.leave = disable, leave
        self.n, self.postfix = 0, ""
        self._start = self._last = time.monotonic()

    def __iter__(self):  # pragma: no cover - trivial
        raise TypeError("LogProgress is updated by hand; wrap ranges with progress_range")

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.n / elapsed
        parts = [f"{self.desc}: {self.n}"]
        if self.total:
            parts[0] += f"/{self.total} ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} it/s" if rate >= 1 or self.n == 0 else f"{1 / rate:.3g} s/it")
        if self.total and self.n and self.n < self.total:
            parts.append(f"ETA {(self.total - self.n) / rate:.0f} s")
        elif self.n:
            parts.append(f"{elapsed:.0f} s")
        if self.postfix:
            parts.append(self.postfix)
        return f"[{time.strftime('%H:%M:%S')}] " + ", ".join(parts)

    def _emit(self, force: bool = False) -> None:
        if self.disable:
            return
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            print(self._line(), file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._emit()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.leave and self.n:
            self._emit(force=True)
        self.disable = True


def progress_bar(total: int | None, desc: str, *, enabled: bool = True, leave: bool = True,
                 stream: TextIO | None = None) -> Any:
    """A bar with ``update``, ``set_postfix_str``, ``set_postfix`` and ``close``.

    Args:
      total: the number of updates expected (None: unknown).
      desc: what is counted.
      enabled: False gives a silent bar (same interface).
      leave: keep the final state on screen / print a final line.
    """
    stream = stream or sys.stderr
    enabled = enabled and _is_primary_process()
    if enabled and getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, file=stream)
    return LogProgress(total, desc, disable=not enabled, leave=leave, stream=stream)


def message(text: str) -> None:
    """A one-line notice that does not break a live bar (process 0 only)."""
    if _is_primary_process():
        tqdm.write(text, file=sys.stderr)
