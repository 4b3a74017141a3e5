"""Data-parallel scaling: a teacher step and an adapter step on 1, 2, 4, … devices.

:func:`run` is what ``nettransplant benchmark`` adds to its step-time
table. For each device count ``n`` it builds a mesh of the first ``n``
devices (:func:`nettransplant.runtime.parallel.data_mesh`) and times, at the same
*global* batch (strong scaling):

* a teacher step (classification + segmentation batch, Adam), optionally in
  mixed precision (``compute_dtype="bfloat16"``);
* a back-distillation step with labelled samples (the adapter's batch and its
  draws split over the devices).

Reported per device count: the median step time, throughput (images or
samples per second), XLA's FLOP count of the compiled step
(``jit(...).lower(...).compile().cost_analysis()``), the model's FLOPs per
step (3 × the forward FLOPs of the images: forward + backward) and, when the
device's peak is known (:data:`PEAK_TFLOPS` or ``peak_tflops``), the model
FLOPs utilisation (MFU). Fake CPU devices (``--cpu_devices``) share the same
cores, so their times show the partitioning overhead, not a speed-up.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nettransplant.benchmarks.step_benchmark import build_transplant
from nettransplant.core import modules
from nettransplant.runtime import parallel
from nettransplant.training import teachers
from nettransplant.training.loop import create_train_state
from nettransplant.transplant import objectives
from nettransplant.transplant.step import make_train_step
from nettransplant.transplant.wiring import split_params

# Spec-sheet dense bf16 peaks (TFLOP/s per device), matched against device_kind.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v5p": 459.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0, "TPU v6": 918.0}


def peak_tflops(device) -> float | None:
    """The spec-sheet bf16 peak of ``device`` (None: unknown, e.g. CPU)."""
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def compiled_flops(compiled) -> float | None:
    """FLOPs of a compiled computation per XLA's cost analysis (None where unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def _time(step, state, args: tuple, steps: int, rounds: int) -> tuple[float, object]:
    """Median over ``rounds`` of the mean step time; the step is warmed up first."""
    state, metrics = step(state, *args)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, *args)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times), state


def teacher_forward_flops(teacher: modules.Teacher, params, image_size: int) -> dict:
    """Forward FLOPs per image of the classification and segmentation routes."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    out = {}
    for name, fn in (("classification", teachers.classification_scores),
                     ("segmentation", teachers.segmentation_scores)):
        compiled = jax.jit(fn, static_argnums=0).lower(teacher, params, x).compile()
        out[name] = compiled_flops(compiled)
    return out


def teacher_scaling(config, mesh, *, steps: int, rounds: int, compute_dtype=None) -> dict:
    """One device count: the teacher step's time, throughput, FLOPs and MFU."""
    m, t = config.model, config.teacher
    teacher = modules.make_teacher(width=m.width, input_size=m.image_size,
                                   dropout_rate=m.dropout_rate, num_classes=m.num_classes)
    optimizer = optax.adam(t.learning_rate)
    state = teachers.create_teacher_state(teacher, jax.random.key(config.seed), m.image_size,
                                          optimizer)
    forward = teacher_forward_flops(teacher, state.params, m.image_size)
    step = teachers.make_teacher_step(teacher, optimizer, mesh=mesh,
                                      compute_dtype=compute_dtype)
    rng = np.random.default_rng(0)
    size, cls_b, seg_b = m.image_size, t.batch_size, t.seg_batch_size
    batch = (*parallel.shard_batch(
                 (rng.normal(size=(cls_b, size, size, 3)).astype(np.float32),
                  rng.integers(0, 2, cls_b).astype(np.int32)), mesh, cls_b),
             *parallel.shard_batch(
                 (rng.normal(size=(seg_b, size, size, 3)).astype(np.float32),
                  rng.integers(0, 2, (seg_b, size, size)).astype(np.int32)), mesh, seg_b))
    state = parallel.replicate(state, mesh)
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = step.lower(state, key, *batch).compile()
    compile_s = time.perf_counter() - start
    step_s, _ = _time(step, state, (key, *batch), steps, rounds)
    images = cls_b + seg_b
    model_flops = None
    if None not in forward.values():  # forward + backward ≈ 3 × forward
        model_flops = 3 * (forward["classification"] * cls_b + forward["segmentation"] * seg_b)
    xla = compiled_flops(compiled)
    n = mesh.size
    peak = peak_tflops(mesh.devices.flat[0])
    return {"step_s": step_s, "images_per_s": images / step_s,
            "images_per_s_per_device": images / step_s / n, "compile_s": compile_s,
            "batch": {"classification": cls_b, "segmentation": seg_b},
            "forward_flops_per_image": forward,
            "model_flops_per_step": model_flops,
            "xla_flops_per_step_per_device": xla,
            "mfu": (model_flops / step_s / (n * peak * 1e12)
                    if model_flops and peak else None),
            "compute_dtype": str(jnp.dtype(compute_dtype or jnp.float32))}


def adapter_scaling(config, mesh, *, steps: int, rounds: int, num_draws: int) -> dict:
    """One device count: a back-distillation step with labelled samples."""
    t, n = config.transplant, parallel.data_size(mesh)
    transplant, params = build_transplant(config, tuple(config.adapters.exp1_1conv))
    adapter_params, frozen = split_params(params)
    key = jax.random.key(config.seed + 1)
    shape = objectives.output_gradient_shape(transplant, image_size=config.model.image_size,
                                             score_size=t.score_size)
    cache = objectives.build_chain_cache(transplant, frozen, key, num_draws, shape)
    scalars = objectives.compute_scalars(cache, 1.0, t.lambda0_classification)
    size = config.model.image_size
    images = jax.random.uniform(key, (t.batch_size, size, size, 3))
    data = objectives.make_transfer_data(transplant, frozen, transplant.features(params, images),
                                         jnp.arange(t.batch_size) % 2, key=key)
    draws_per_step = -(-t.draws_per_step // n) * n  # at least one draw per device
    optimizer = optax.adam(t.learning_rate)
    step = make_train_step(transplant, "back-distill", optimizer, mesh=mesh)
    state = parallel.replicate(create_train_state(adapter_params, optimizer), mesh)
    args = (*parallel.replicate((frozen, scalars, data, cache), mesh),
            jnp.arange(t.batch_size), jnp.arange(draws_per_step) % num_draws)
    step_s, _ = _time(step, state, args, steps, rounds)
    return {"step_s": step_s, "samples_per_s": t.batch_size / step_s,
            "draws_per_s": draws_per_step / step_s, "batch_size": t.batch_size,
            "draws_per_step": draws_per_step}


def run(config, *, device_counts: list[int] | None = None, steps: int = 5, rounds: int = 3,
        num_draws: int = 64, compute_dtype=None) -> dict:
    """Time the teacher and adapter steps on meshes of each device count.

    Args:
      device_counts: default 1, 2, 4, … up to every device (and every device).
      compute_dtype: the teachers' compute dtype (None: float32; ``"bfloat16"``).
    Returns:
      ``{"devices": …, "per_device_count": {n: {"teacher": …, "adapter": …}}}``.
    """
    devices = jax.devices()
    if device_counts is None:
        device_counts = sorted({2 ** i for i in range(len(devices).bit_length())
                                if 2 ** i <= len(devices)} | {len(devices)})
    too_many = [n for n in device_counts if n > len(devices)]
    if too_many:
        raise ValueError(f"device counts {too_many} exceed the {len(devices)} devices")
    fake = devices[0].platform == "cpu" and len(devices) > 1
    results = {"device_kind": devices[0].device_kind, "platform": devices[0].platform,
               "device_count": len(devices), "peak_tflops_per_device": peak_tflops(devices[0]),
               "note": ("fake CPU devices share the same cores: the times show the cost of "
                        "partitioning, not a speed-up") if fake else "",
               "timing": f"median over {rounds} rounds of {steps} steps, global batch fixed",
               "per_device_count": {}}
    for n in device_counts:
        mesh = parallel.data_mesh(devices[:n])
        results["per_device_count"][str(n)] = {
            "teacher": teacher_scaling(config, mesh, steps=steps, rounds=rounds,
                                       compute_dtype=compute_dtype),
            "adapter": adapter_scaling(config, mesh, steps=steps, rounds=rounds,
                                       num_draws=num_draws)}
    return results


def format_table(results: dict) -> str:
    """Per device count: teacher and adapter step times and throughputs."""
    lines = [f"data-parallel scaling on {results['device_kind']} ({results['timing']})"]
    if results["note"]:
        lines.append(f"note: {results['note']}")
    lines.append(f"{'devices':>7}  {'teacher step':>12}  {'images/s':>9}  {'MFU':>6}  "
                 f"{'adapter step':>12}  {'samples/s':>9}")
    for n, r in results["per_device_count"].items():
        t, a = r["teacher"], r["adapter"]
        mfu = "-" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
        lines.append(f"{n:>7}  {t['step_s'] * 1e3:>10.1f}ms  {t['images_per_s']:>9.0f}  "
                     f"{mfu:>6}  {a['step_s'] * 1e3:>10.1f}ms  {a['samples_per_s']:>9.0f}")
    return "\n".join(lines)
