"""Step-time benchmark of back-distillation against its baselines, side by side in one run.

:func:`run` is what ``nettransplant benchmark`` calls. Every step kind is
compiled and warmed up first (compile time reported separately), then timed in
interleaved rounds, so every kind sees the same machine noise; the reported time
is the median over rounds of the mean step time in a round. Times are in seconds.

:func:`nettransplant.benchmarks.torch_comparison.torch_section` times, the same way,
each method's library step beside the same step written as a PyTorch user would
(:mod:`nettransplant.benchmarks.torch_reference`), rounds alternating between
them; without PyTorch it returns a one-line note instead.

:func:`threads_section` times whole adapter trainings one after another and in
threads (the main job's ``config.concurrent_cells``), rounds alternating.

:func:`runs_section` times one problem's runs (every labelled sample count of the
config) trained one at a time and as one batched computation on a runs axis
(:mod:`nettransplant.transplant.runs`, the main job's ``config.transplant.runs_axis``),
with the compile time of each way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from nettransplant.core.adapter import Adapter
from nettransplant.core.modules import CategoryModule, ClassificationTaskModule, category_channels
from nettransplant.runtime import parallel
from nettransplant.runtime.files import write_atomically
from nettransplant.training.loop import IndexStream, Trainings, create_train_state
from nettransplant.transplant import closed_form, objectives, problem, runs
from nettransplant.transplant.step import RawDraws, make_train_step, raw_draws, train_adapter
from nettransplant.transplant.wiring import Transplant, split_params


def _block(tree) -> None:
    jax.block_until_ready(tree)


class StepTimer:
    """Compile/warm up a step once, then time ``steps`` calls per round.

    ``sync(metrics)`` waits for the step's work (default: JAX's
    ``block_until_ready``; a PyTorch step on the CPU needs nothing).
    """

    def __init__(self, name: str, step: Callable, state, args: tuple, steps: int, *,
                 sync: Callable = _block):
        self.name, self.step, self.args, self.steps, self.sync = name, step, args, steps, sync
        start = time.perf_counter()
        self.state, metrics = step(state, *args)
        sync(metrics)
        self.compile_s = time.perf_counter() - start
        self.state, metrics = step(self.state, *args)  # warm-up
        sync(metrics)
        self.rounds: list[float] = []

    def run_round(self) -> None:
        start = time.perf_counter()
        for _ in range(self.steps):
            self.state, metrics = self.step(self.state, *self.args)
        self.sync(metrics)
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
    # Jitted: eager initialisation dispatches (and compiles) op by op, for many seconds.
    params = jax.jit(transplant.init, static_argnums=1)(jax.random.key(config.seed),
                                                        m.image_size)
    params["student_task_module"] = params["teacher_task_module"]
    return transplant, params


@dataclasses.dataclass
class Problem:
    """What every timed step reads: the transplant, its parameters, draws, scalars and data."""

    transplant: Transplant
    params: dict
    adapter_params: Any
    frozen: dict
    cache: objectives.ChainCache
    raw: RawDraws  # the cache's draws, uncached (the naive step recomputes them)
    scalars: objectives.TransplantScalars
    data: objectives.TransferData
    cache_s: float  # time to build the chain cache


def build_problem(config, adapter_spec: tuple[int, int], num_draws: int) -> Problem:
    """:func:`build_transplant`'s transplant with ``num_draws`` cached draws, the scalars
    (β = 1) and a labelled batch of ``config.transplant.batch_size`` random images."""
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
    raw = raw_draws(key, num_draws, shape, draws=transplant.draws)
    scalars = objectives.compute_scalars(cache, 1.0, t.lambda0_classification)
    size = config.model.image_size
    images = jax.random.uniform(key, (t.batch_size, size, size, 3))
    data = objectives.make_transfer_data(
        transplant, frozen, transplant.features(params, images),
        jnp.arange(t.batch_size) % 2, key=key)
    return Problem(transplant, params, adapter_params, frozen, cache, raw, scalars, data,
                   cache_s)


def benchmark_steps(config, adapter_spec, *, steps: int, rounds: int, num_draws: int,
                    naive_steps: int) -> dict:
    t = config.transplant
    p = build_problem(config, adapter_spec, num_draws)
    transplant, adapter_params, frozen = p.transplant, p.adapter_params, p.frozen
    cache, raw, scalars, data = p.cache, p.raw, p.scalars, p.data
    batch_index = jnp.arange(t.batch_size)
    draw_index = jnp.arange(t.draws_per_step)
    optimizer = optax.adam(t.learning_rate)

    def timer(name, method, data_arg, draws, b_idx, d_idx, n, recompute=False):
        step = make_train_step(transplant, method, optimizer, recompute_chains=recompute,
                               mesh=one_device())
        state = create_train_state(adapter_params, optimizer)
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
    result["chain_cache_build_s"] = p.cache_s
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
    step = make_train_step(transplant, "back-distill", optimizer, mesh=one_device())
    state = create_train_state(adapter_params, optimizer)
    stream = IndexStream(cache.num_draws, t.draws_per_step, config.seed)
    warm = create_train_state(adapter_params, optimizer)
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


def _aligned(rows: list[tuple[str, ...]], *, first_left: bool = True) -> list[str]:
    """``rows`` (the first one a header) as lines of padded columns, numbers right-aligned,
    a rule under the header; the first column left-aligned when ``first_left``."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 and first_left else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


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
    return "\n".join(_aligned(rows, first_left=False))


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


def threads_section(config, adapter: str, *, workers: int, fits: int, num_steps: int,
                    rounds: int, num_draws: int) -> dict:
    """``fits`` whole trainings (:func:`~nettransplant.transplant.step.train_adapter`,
    ``num_steps`` steps, seeds 0 … fits − 1) per method, one after another and in
    ``workers`` threads (:class:`~nettransplant.training.loop.Trainings`), rounds
    alternating; direct-learn and back-distill with a labelled batch, on
    :func:`build_problem`'s problem for ``adapter``.

    Returns per method the median seconds of both ways, their ratio, and whether
    the threaded fits' parameters equal the serial ones bit for bit.
    """
    t = config.transplant
    spec = tuple(config.adapters[adapter])
    p = build_problem(config, spec, num_draws)
    optimizer, mesh = optax.adam(t.learning_rate), one_device()
    methods = {}
    for method in ("direct-learn", "back-distill"):
        step = make_train_step(p.transplant, method, optimizer, mesh=mesh)

        def fit(seed, step=step, method=method):
            state = create_train_state(p.adapter_params, optimizer)
            state, _ = train_adapter(
                step, state, p.frozen, p.scalars, num_steps=num_steps, data=p.data,
                num_samples=t.batch_size, batch_size=t.batch_size,
                draws=p.cache if method == "back-distill" else None,
                draws_per_step=t.draws_per_step, seed=seed, progress=False,
                log_every=num_steps, mesh=mesh)
            return jax.block_until_ready(state.params)

        jobs = [functools.partial(fit, seed) for seed in range(fits)]
        fit(0)  # compiled before timing
        times: dict[int, list[float]] = {1: [], workers: []}
        params = {}
        for _ in tqdm(range(rounds), desc=f"{method} fits, 1 and {workers} threads",
                      leave=False):
            for count in times:
                start = time.perf_counter()
                with Trainings(count) as trainings:
                    results = [trainings.submit(job) for job in jobs]
                    params[count] = [result() for result in results]
                times[count].append(time.perf_counter() - start)
        same = all(bool(jnp.array_equal(a, b)) for pair in zip(params[1], params[workers])
                   for a, b in zip(*(jax.tree.leaves(tree) for tree in pair)))
        serial, threaded = (statistics.median(times[c]) for c in times)
        methods[method] = {"serial_s": serial, "threaded_s": threaded,
                           "speedup": serial / threaded, "same_parameters": same}
    return {"adapter": {"name": adapter, "description": ADAPTERS[adapter]},
            "workers": workers, "fits": fits, "num_steps": num_steps,
            "timing": f"median over {rounds} rounds, one after another and in threads "
                      "alternating", "methods": methods}


def _compile_seconds() -> float:
    from nettransplant.experiments.timing import compile_seconds
    return compile_seconds()


def runs_section(config, adapter: str, *, runs_per_count: int, num_steps: int, rounds: int,
                 num_draws: int, methods=("direct-learn", "back-distill")) -> dict:
    """One problem's runs, one at a time and batched on a runs axis, rounds alternating.

    The runs: ``runs_per_count`` seeds at each labelled sample count of the config
    (random images, labels alternating), ``num_steps`` steps each, no early end, on
    :func:`build_problem`'s problem for ``adapter``; per method in ``methods``.
    Returns the headline keys (seconds of the problem: the methods' runs together,
    and the compile of each way) and per method the same.
    """
    t, m = config.transplant, config.model
    spec = tuple(config.adapters[adapter])
    p = build_problem(config, spec, num_draws)
    counts = [int(n) for n in config.sample_counts if n > 0] * runs_per_count
    pad = max(max(counts), t.batch_size)
    key = jax.random.key(config.seed + 2)
    images = jax.random.uniform(key, (pad, m.image_size, m.image_size, 3))
    features = p.transplant.features(p.params, images)
    labels = jnp.arange(pad) % 2
    data = {n: objectives.make_transfer_data(p.transplant, p.frozen, features[:n], labels[:n],
                                             key=key, pad_to=pad) for n in set(counts)}
    optimizer, mesh = problem.adam(t.learning_rate), one_device()
    out: dict[str, Any] = {"adapter": {"name": adapter, "description": ADAPTERS[adapter]},
                           "counts": counts, "num_steps": num_steps,
                           "timing": f"median over {rounds} rounds, both ways alternating",
                           "methods": {}}
    for method in methods:
        steps = problem.StepCache(optimizer, mesh=mesh)
        draws = p.cache if method == "back-distill" else None

        def alone(method=method, steps=steps, draws=draws):
            for i, n in enumerate(counts):
                state = create_train_state(p.adapter_params, optimizer)
                state, _ = train_adapter(
                    steps(p.transplant, method), state, p.frozen, p.scalars,
                    num_steps=num_steps, data=data[n], num_samples=n,
                    batch_size=t.batch_size, draws=draws, draws_per_step=t.draws_per_step,
                    seed=i, progress=False, log_every=num_steps, mesh=mesh)
                jax.block_until_ready(state.params)

        def batched(method=method, steps=steps, draws=draws):
            jobs = [runs.Run(create_train_state(p.adapter_params, optimizer), p.scalars,
                             data[n], n, i, num_steps) for i, n in enumerate(counts)]
            results = runs.train_runs(steps.runs(p.transplant, method), jobs, p.frozen,
                                      batch_size=t.batch_size, draws=draws,
                                      draws_per_step=t.draws_per_step, log_every=num_steps)
            jax.block_until_ready([r.state.params for r in results])

        compile_s = {}
        for name, fn in (("one_at_a_time", alone), ("batched", batched)):
            before = _compile_seconds()
            fn()  # compiled (and warmed up) before timing
            compile_s[name] = _compile_seconds() - before
        times: dict[str, list[float]] = {"one_at_a_time": [], "batched": []}
        for _ in tqdm(range(rounds), desc=f"{method}: {len(counts)} runs, one at a time "
                      "and batched", leave=False):
            for name, fn in (("one_at_a_time", alone), ("batched", batched)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        one, batch = (statistics.median(times[k]) for k in ("one_at_a_time", "batched"))
        out["methods"][method] = {"one_at_a_time_s": one, "batched_s": batch,
                                  "speedup": one / batch,
                                  "compile_one_at_a_time_s": compile_s["one_at_a_time"],
                                  "compile_batched_s": compile_s["batched"]}
    rows = out["methods"].values()
    out.update({"transplant_problem_batched_s": sum(r["batched_s"] for r in rows),
                "transplant_problem_one_at_a_time_s": sum(r["one_at_a_time_s"] for r in rows),
                "transplant_runs": len(counts),
                "transplant_compile_batched_s": sum(r["compile_batched_s"] for r in rows),
                "transplant_compile_one_at_a_time_s": sum(r["compile_one_at_a_time_s"]
                                                          for r in rows)})
    return out


def format_runs_table(section: dict) -> str:
    """Per method: a problem's runs one at a time and batched (seconds, compile) and the
    ratio."""
    header = (f"{section['transplant_runs']} runs (samples {section['counts']}) of "
              f"{section['num_steps']} steps, adapter {section['adapter']['name']}: one at a "
              f"time vs batched on a runs axis; {section['timing']}")
    rows = [("method", "one at a time", "batched", "speedup", "compile 1-at-a-time",
             "compile batched")]
    for name, r in section["methods"].items():
        rows.append((name, f"{r['one_at_a_time_s']:.2f}s", f"{r['batched_s']:.2f}s",
                     f"{r['speedup']:.2f}", f"{r['compile_one_at_a_time_s']:.1f}s",
                     f"{r['compile_batched_s']:.1f}s"))
    return "\n".join([header, *_aligned(rows)])


def format_threads_table(section: dict) -> str:
    """Per method: the fits' seconds one after another and in threads, and the ratio."""
    header = (f"{section['fits']} trainings of {section['num_steps']} steps, adapter "
              f"{section['adapter']['name']}: one after another vs {section['workers']} "
              f"threads; {section['timing']}")
    rows = [("method", "serial", "threads", "speedup", "same params")]
    for name, r in section["methods"].items():
        rows.append((name, f"{r['serial_s']:.2f}s", f"{r['threaded_s']:.2f}s",
                     f"{r['speedup']:.2f}", "yes" if r["same_parameters"] else "NO"))
    return "\n".join([header, *_aligned(rows)])


def write_json(results: dict, path: str) -> None:
    """``results`` as JSON at ``path`` (atomically)."""
    write_atomically(path, json.dumps(results, indent=2,
                                      default=lambda o: np.asarray(o).tolist()))
