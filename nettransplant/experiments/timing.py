"""Where the main job's time goes: XLA compilation counted per process and per thread,
and a cell's clock (compile, train, evaluation)."""

from __future__ import annotations

import contextlib
import threading
import time

import jax

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]  # tracing + lowering + XLA compilation, this process
_thread_compile = threading.local()  # the same, per thread (a cell's own compiles)


def _count_compilation(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration
        _thread_compile.seconds = getattr(_thread_compile, "seconds", 0.0) + duration


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling with XLA so far."""
    return _compile_seconds[0]


def thread_compile_seconds() -> float:
    """Seconds the calling thread has spent tracing, lowering and compiling so far."""
    return getattr(_thread_compile, "seconds", 0.0)


class CellClock:
    """Where one cell's time goes: compile, train (steps run and images computed, every
    attempt included) and evaluation, each in seconds of its own thread.

    ``with clock.phase("train"):`` charges the block's wall time to ``train`` less the
    compiles inside it, which go to ``compile``.
    """

    def __init__(self):
        self.seconds = {"compile": 0.0, "train": 0.0, "eval": 0.0}
        self.steps = self.images = self.attempts = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        start, compiled = time.perf_counter(), thread_compile_seconds()
        try:
            yield
        finally:
            compile_s = thread_compile_seconds() - compiled
            self.seconds["compile"] += compile_s
            self.seconds[name] = (self.seconds.get(name, 0.0)
                                  + time.perf_counter() - start - compile_s)

    def as_dict(self) -> dict:
        return {**{f"{k}_s": v for k, v in self.seconds.items()}, "steps": self.steps,
                "images": self.images, "attempts": self.attempts}
