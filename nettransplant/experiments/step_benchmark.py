"""Step-time benchmark of back-distillation against its baselines, side by side in one run.

:func:`run` is what ``python -m launch.benchmark`` calls. Every step kind is
compiled and warmed up first (compile time reported separately), then timed in
interleaved rounds, so every kind sees the same machine noise; the reported time
is the median over rounds of the mean step time in a round. Times are in seconds.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from nettransplant import closed_form, objectives, parallel, train
from nettransplant.adapter import Adapter
from nettransplant.files import write_atomically
from nettransplant.modules import CategoryModule, ClassificationTaskModule, category_channels
from nettransplant.transplant import Transplant, split_params


def _block(tree) -> None:
    jax.block_until_ready(tree)


class StepTimer:
    """Compile/warm up a step once, then time ``steps`` calls per round."""

    def __init__(self, name: str, step: Callable, state, args: tuple, steps: int):
        self.name, self.step, self.args, self.steps = name, step, args, steps
        start = time.perf_counter()
        self.state, metrics = step(state, *args)
        _block(metrics)
        self.compile_s = time.perf_counter() - start
        self.state, metrics = step(self.state, *args)  # warm-up
        _block(metrics)
        self.rounds: list[float] = []

    def run_round(self) -> None:
        start = time.perf_counter()
        for _ in range(self.steps):
            self.state, metrics = self.step(self.state, *self.args)
        _block(metrics)
        self.rounds.append((time.perf_counter() - start) / self.steps)

    @property
    def median_s(self) -> float:
        return statistics.median(self.rounds)


def one_device():
    """The step kinds are compared on one device (scaling_benchmark covers more)."""
    return parallel.data_mesh(jax.devices()[:1])


def build_transplant(config, adapter_spec: tuple[int, int]) -> tuple[Transplant, dict]:
    """Exp. 1 setting: one classification teacher, reorder + adapter inside it."""
    m = config.model
    channels = category_channels(m.width)
    task_module = ClassificationTaskModule(width=m.width, input_size=m.image_size,
                                           dropout_rate=m.dropout_rate)
    num_convs, kernel = adapter_spec
    transplant = Transplant(
        category_module=CategoryModule(width=m.width),
        adapter=Adapter(channels, num_convs, kernel, reorder_seed=config.seed),
        student_task_module=task_module, teacher_task_module=task_module,
        task_dummy_relu="random_mask", adapter_dummy_relu="identity",
        positive_fraction=config.transplant.positive_fraction)
    params = transplant.init(jax.random.key(config.seed), m.image_size)
    params["student_task_module"] = params["teacher_task_module"]
    return transplant, params


def benchmark_steps(config, adapter_spec, *, steps: int, rounds: int, num_draws: int,
                    naive_steps: int) -> dict:
    t = config.transplant
    transplant, params = build_transplant(config, adapter_spec)
    adapter_params, frozen = split_params(params)
    key = jax.random.key(config.seed + 1)
    shape = objectives.output_gradient_shape(transplant, image_size=config.model.image_size,
                                             score_size=t.score_size)
    start = time.perf_counter()
    cache = objectives.build_chain_cache(transplant, frozen, key, num_draws, shape)
    _block(cache)
    cache_s = time.perf_counter() - start
    raw = train.raw_draws(key, num_draws, shape, draws=transplant.draws)
    scalars = objectives.compute_scalars(cache, 1.0, t.lambda0_classification)
    size = config.model.image_size
    images = jax.random.uniform(key, (t.batch_size, size, size, 3))
    data = objectives.make_transfer_data(
        transplant, frozen, transplant.features(params, images),
        jnp.arange(t.batch_size) % 2, key=key)
    batch_index = jnp.arange(t.batch_size)
    draw_index = jnp.arange(t.draws_per_step)
    optimizer = optax.adam(t.learning_rate)

    def timer(name, method, data_arg, draws, b_idx, d_idx, n, recompute=False):
        step = train.make_train_step(transplant, method, optimizer, recompute_chains=recompute,
                                     mesh=one_device())
        state = train.create_train_state(adapter_params, optimizer)
        return StepTimer(name, step, state, (frozen, scalars, data_arg, draws, b_idx, d_idx), n)

    timers = [
        timer("direct_learn_step_s", "direct-learn", data, None, batch_index, None, steps),
        timer("back_distill_zero_step_s", "back-distill", None, cache, None, draw_index, steps),
        timer("back_distill_task_step_s", "back-distill", data, cache, batch_index, draw_index,
              steps),
        timer("naive_back_distill_step_s", "back-distill", None, raw, None, draw_index,
              naive_steps, recompute=True),
    ]
    for _ in tqdm(range(rounds), desc=f"adapter {adapter_spec} rounds", leave=False):
        for tm in timers:  # interleaved: every kind sees the same machine noise
            tm.run_round()
    result = {tm.name: tm.median_s for tm in timers}
    result["compile_s"] = {tm.name: tm.compile_s for tm in timers}
    result["chain_cache_build_s"] = cache_s
    result["num_draws_cached"] = num_draws
    if adapter_spec[0] == 1:
        result |= time_to_loss(transplant, adapter_params, frozen, cache, scalars, config)
    return result


def time_to_loss(transplant, adapter_params, frozen, cache, scalars, config) -> dict:
    """Closed form vs SGD (Adam) on the same zero-sample objective over the cached bank."""
    t = config.transplant

    def solve():
        return closed_form.solve_single_conv_adapter(
            transplant, cache, scalars, ridge=t.closed_form_ridge,
            num_draws=min(t.closed_form_draws, cache.num_draws), mesh=one_device())

    full_loss = jax.jit(lambda p: objectives.back_distill_term(transplant, p, cache, scalars))
    _block(solve())  # compile
    start = time.perf_counter()
    solution = solve()
    _block(solution)
    closed_form_s = time.perf_counter() - start

    optimizer = optax.adam(t.learning_rate)
    step = train.make_train_step(transplant, "back-distill", optimizer, mesh=one_device())
    state = train.create_train_state(adapter_params, optimizer)
    stream = train.IndexStream(cache.num_draws, t.draws_per_step, config.seed)
    warm = train.create_train_state(adapter_params, optimizer)
    _block(step(warm, frozen, scalars, None, cache, None, jnp.asarray(stream.next())))
    sgd_steps = t.num_steps
    start = time.perf_counter()
    for _ in range(sgd_steps):
        state, metrics = step(state, frozen, scalars, None, cache, None,
                              jnp.asarray(stream.next()))
    _block(state)
    sgd_s = time.perf_counter() - start
    return {
        "closed_form_time_to_loss_s": closed_form_s,
        "sgd_time_to_loss_s": sgd_s,
        "closed_form_draws": min(t.closed_form_draws, cache.num_draws),
        "closed_form_loss": float(full_loss(solution)),
        "sgd_final_loss": float(full_loss(state.params)),
        "sgd_steps": sgd_steps,
    }


ADAPTERS = {"exp1_1conv": "1-conv 3×3 (Exp. 1)", "exp1_3conv": "3-conv 3×3 (Exp. 1)",
            "exp2": "3-conv 1×1 (Exp. 2)", "exp3": "1-conv 1×1 (Exp. 3)"}


def format_table(results: dict) -> str:
    rows = [("adapter", "direct", "bd-zero", "bd-task", "naive", "zero/direct", "task/direct",
             "naive/zero", "cf s", "sgd s", "sgd/cf")]
    for name, r in results["adapters"].items():
        d = r["direct_learn_step_s"]
        z = r["back_distill_zero_step_s"]
        k = r["back_distill_task_step_s"]
        n = r["naive_back_distill_step_s"]
        cf = r.get("closed_form_time_to_loss_s")
        sgd = r.get("sgd_time_to_loss_s")
        rows.append((name, f"{d * 1e3:.1f}ms", f"{z * 1e3:.1f}ms", f"{k * 1e3:.1f}ms",
                     f"{n * 1e3:.1f}ms", f"{z / d:.2f}", f"{k / d:.2f}", f"{n / z:.1f}",
                     "-" if cf is None else f"{cf:.3f}", "-" if sgd is None else f"{sgd:.2f}",
                     "-" if cf is None else f"{sgd / cf:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(config, *, mode: str, adapters: list[str], steps: int, rounds: int,
        num_draws: int) -> dict:
    """Time every step kind for each adapter of ``adapters`` (names in :data:`ADAPTERS`).

    Returns the results dict (``adapters``: per adapter the median step times,
    compile times and the closed form's time to loss; the embedded default's
    main adapter's times also at the top level).
    """
    unknown = [a for a in adapters if a not in ADAPTERS]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; choose from {list(ADAPTERS)}")
    results = {
        "mode": mode,
        "config": {"model": config.model.to_dict(), "transplant": config.transplant.to_dict()},
        "device": str(jax.devices()[0]), "device_count": jax.device_count(),
        "jax_version": jax.__version__, "platform": platform.platform(),
        "timing": f"median over {rounds} interleaved rounds of {steps} steps (naive: fewer)",
        "adapters": {},
    }
    for name in tqdm(adapters, desc="benchmark"):
        spec = tuple(config.adapters[name])
        r = benchmark_steps(config, spec, steps=steps, rounds=rounds, num_draws=num_draws,
                            naive_steps=max(2, steps // 4))
        r["adapter"] = {"name": name, "num_convs": spec[0], "kernel_size": spec[1],
                        "description": ADAPTERS[name]}
        results["adapters"][name] = r
    # The headline keys: the embedded default's main adapter (Exp. 1, 1-conv 3×3).
    headline = results["adapters"].get("exp1_1conv") or next(iter(results["adapters"].values()))
    for key in ("direct_learn_step_s", "back_distill_zero_step_s", "back_distill_task_step_s",
                "naive_back_distill_step_s", "closed_form_time_to_loss_s", "sgd_time_to_loss_s"):
        if key in headline:
            results[key] = headline[key]
    return results


def write_json(results: dict, path: str) -> None:
    """``results`` as JSON at ``path`` (atomically)."""
    write_atomically(path, json.dumps(results, indent=2,
                                      default=lambda o: np.asarray(o).tolist()))
