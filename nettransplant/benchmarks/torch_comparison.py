"""The adapter step beside the same step written in PyTorch: ``launch.benchmark``'s PyTorch section.

Each row times the library's jitted step (:mod:`nettransplant.benchmarks.step_benchmark`'s
protocol) and :mod:`nettransplant.benchmarks.torch_reference`'s step on the same problem.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from nettransplant.benchmarks.step_benchmark import (
    ADAPTERS,
    StepTimer,
    _aligned,
    build_problem,
    one_device,
)
from nettransplant.training.loop import create_train_state
from nettransplant.transplant.step import make_train_step

# Row → (method, with a labelled batch, with draws of (G_y', x_rand)).
TORCH_ROWS: dict[str, tuple[str, bool, bool]] = {
    "direct-learn": ("direct-learn", True, False),
    "distill": ("distill", True, False),
    "back-distill (0 samples)": ("back-distill", False, True),
    "back-distill (task)": ("back-distill", True, True),
    "jacobian": ("jacobian", True, False),
}


def torch_unavailable() -> str | None:
    """A one-line reason the PyTorch section cannot run here, or None."""
    if importlib.util.find_spec("torch") is None:
        return ("PyTorch comparison skipped: PyTorch is not installed "
                "(pip install -e '.[torch]')")
    return None


def _torch_device(torch) -> str | None:
    """PyTorch's device matching JAX's (None: PyTorch has no such device)."""
    platform_ = jax.devices()[0].platform
    if platform_ == "cpu":
        return "cpu"
    if platform_ == "gpu" and torch.cuda.is_available():
        return "cuda"
    return None


def compare_with_torch(config, adapter_spec: tuple[int, int], *, steps: int, rounds: int,
                       num_draws: int, rows: tuple[str, ...] = tuple(TORCH_ROWS),
                       torch_threads: int | None = None) -> dict:
    """Each method's library step beside the PyTorch user's step, on the same problem.

    Both start from the same weights and train their own copy of the adapter
    with Adam on the same batch and draws. For back-distillation the library's
    naive step (``recompute_chains=True``: the frozen chains run every step, as
    in the PyTorch step) is timed too. Rounds alternate between every step.

    Args:
      torch_threads: PyTorch's intra-op threads for this section (default: its
        own default, one per core).
    Returns:
      ``{"methods": {row: {"jax_step_s", "torch_step_s", "jax_over_torch", …}}, …}``
      with the PyTorch version, device and thread count.
    """
    import torch

    threads = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        return _compare_with_torch(torch, config, adapter_spec, steps=steps, rounds=rounds,
                                   num_draws=num_draws, rows=rows)
    finally:
        torch.set_num_threads(threads)


def _compare_with_torch(torch, config, adapter_spec, *, steps, rounds, num_draws, rows) -> dict:

    from nettransplant.benchmarks import torch_reference as tr

    unknown = [r for r in rows if r not in TORCH_ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {list(TORCH_ROWS)}")
    device = _torch_device(torch)
    if device is None:
        raise ValueError(f"PyTorch has no device for JAX's {jax.devices()[0].platform}")
    t = config.transplant
    p = build_problem(config, adapter_spec, num_draws)
    optimizer = optax.adam(t.learning_rate)
    batch_index, draw_index = jnp.arange(t.batch_size), jnp.arange(t.draws_per_step)
    reference = tr.from_jax(p.transplant, p.params, p.scalars, score_size=t.score_size,
                            device=device)
    torch_data = tr.data_from_jax(p.data, device)
    torch_draws = tr.draws_from_jax(p.transplant, reference, p.raw.output_gradients,
                                    p.raw.mask_keys)
    torch_index = (torch.arange(t.batch_size, device=device),
                   torch.arange(t.draws_per_step, device=device))

    def torch_sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    def jax_timer(name, method, with_batch, draws, recompute=False):
        step = make_train_step(p.transplant, method, optimizer,
                               recompute_chains=recompute, mesh=one_device())
        state = create_train_state(p.adapter_params, optimizer)
        args = (p.frozen, p.scalars, p.data if with_batch else None, draws,
                batch_index if with_batch else None, None if draws is None else draw_index)
        return StepTimer(name, step, state, args, steps)

    def torch_timer(name, method, with_batch, with_draws):
        problem = tr.from_jax(p.transplant, p.params, p.scalars, score_size=t.score_size,
                              device=device)  # its own adapter, trained by its own Adam
        step = tr.make_train_step(problem, method, tr.adam(problem, t.learning_rate))
        args = (torch_data if with_batch else None, torch_draws if with_draws else None,
                *torch_index)
        return StepTimer(name, lambda state, *a: (state, step(*a)), None, args, steps,
                         sync=torch_sync)

    timers: dict[str, dict[str, StepTimer]] = {}
    for row in rows:
        method, with_batch, with_draws = TORCH_ROWS[row]
        timers[row] = {"jax": jax_timer(row, method, with_batch,
                                        p.cache if with_draws else None)}
        if with_draws:
            timers[row]["jax_naive"] = jax_timer(row, method, with_batch, p.raw, recompute=True)
        timers[row]["torch"] = torch_timer(row, method, with_batch, with_draws)
    for _ in tqdm(range(rounds), desc="PyTorch side by side", leave=False):
        for kinds in timers.values():  # alternating: JAX and PyTorch see the same noise
            for timer in kinds.values():
                timer.run_round()
    methods = {}
    for row, kinds in timers.items():
        torch_s = kinds["torch"].median_s
        r = {"method": TORCH_ROWS[row][0], "labelled_batch": TORCH_ROWS[row][1],
             "draws": TORCH_ROWS[row][2], "torch_step_s": torch_s,
             "torch_first_step_s": kinds["torch"].compile_s}
        for kind in ("jax", "jax_naive"):
            if kind in kinds:
                r[f"{kind}_step_s"] = kinds[kind].median_s
                r[f"{kind}_over_torch"] = kinds[kind].median_s / torch_s
                r[f"{kind}_compile_s"] = kinds[kind].compile_s
        methods[row] = r
    return {
        "torch_version": torch.__version__, "torch_device": device,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "batch_size": t.batch_size, "draws_per_step": t.draws_per_step,
        "num_draws_cached": num_draws,
        "timing": f"median over {rounds} rounds of {steps} steps, JAX and PyTorch alternating",
        "methods": methods,
    }


def torch_section(config, adapter: str, *, steps: int, rounds: int, num_draws: int,
                  rows: tuple[str, ...] = tuple(TORCH_ROWS),
                  torch_threads: int | None = None) -> dict:
    """:func:`compare_with_torch` for the adapter named ``adapter`` (in :data:`ADAPTERS`),
    or ``{"skipped": reason}`` where PyTorch is missing or has no device like JAX's."""
    note = torch_unavailable()
    if note is None:
        import torch

        if _torch_device(torch) is None:
            note = (f"PyTorch comparison skipped: JAX runs on {jax.devices()[0].platform}, "
                    "where this PyTorch has no device")
    if note is not None:
        return {"skipped": note}
    spec = tuple(config.adapters[adapter])
    result = compare_with_torch(config, spec, steps=steps, rounds=rounds,
                                num_draws=num_draws, rows=rows, torch_threads=torch_threads)
    return {"adapter": {"name": adapter, "num_convs": spec[0], "kernel_size": spec[1],
                        "description": ADAPTERS[adapter]}, **result}


def format_torch_table(section: dict) -> str:
    """Per method: JAX and PyTorch ms/step and their ratio (or the section's skip note)."""
    if "skipped" in section:
        return section["skipped"]
    header = (f"JAX vs PyTorch, adapter {section['adapter']['name']} "
              f"({section['adapter']['description']}): PyTorch {section['torch_version']} on "
              f"{section['torch_device']}, {section['torch_num_threads']} "
              f"thread{'s' if section['torch_num_threads'] != 1 else ''}, "
              f"{section['cpu_count']} cores; {section['timing']}")
    rows = [("method", "jax", "jax naive", "torch", "jax/torch", "naive/torch")]
    for name, r in section["methods"].items():
        naive = r.get("jax_naive_step_s")
        rows.append((name, f"{r['jax_step_s'] * 1e3:.1f}ms",
                     "-" if naive is None else f"{naive * 1e3:.1f}ms",
                     f"{r['torch_step_s'] * 1e3:.1f}ms", f"{r['jax_over_torch']:.2g}",
                     "-" if naive is None else f"{r['jax_naive_over_torch']:.2g}"))
    return "\n".join([header, *_aligned(rows)])
