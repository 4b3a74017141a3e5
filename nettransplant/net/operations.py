"""The elementary operations that grow a transplant net (the paper's supplement, Fig. 1).

Each takes a :class:`~nettransplant.net.graph.TransplantNet` and returns
``(grown net, report)``; the input net is never changed and every module and
adapter it had keeps its parameter arrays, so every route that existed before
gives bit-identical outputs after.

* :func:`transplant` (Step 2): a teacher's category module joins the net and is
  connected to an existing task module ``g_S`` by an adapter learned with any
  method of the engine (back-distillation by default) from 0…N labelled samples,
  with the teacher's own task module as ``g_T``; the teacher's *other* task
  modules join too, wired directly to its category module.
* :func:`connect` (Step 3): a new adapter between a category module and a task
  module that are both in the net.
* :func:`add_task` (Step 1): a new task module learned from labelled samples on
  the (frozen) features of one or more category modules.
* :func:`fine_tune` (paper §5, optional): a task module trained further on
  several of its routes; the other routes through it change too — measure
  that forgetting with :meth:`TransplantNet.evaluate` before and after.
* :func:`rank_task_modules`: candidates to transplant onto, ranked by the
  zero-sample back-distillation residual (the share of the teacher's
  pseudo-gradients the best single 1×1 conv cannot reproduce).

Images passed to operations are uint8 RGB; each is normalised as its
category module expects (:class:`~nettransplant.net.graph.InputSpec`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nettransplant.core.adapter import Adapter
from nettransplant.net.graph import ModuleRef, TaskModule, TeacherParts, TransplantNet
from nettransplant.net.task_training import TaskTrainingSettings, train_task_module
from nettransplant.transplant import objectives, problem
from nettransplant.transplant.wiring import Draws, Transplant, check_draws

Array = jax.Array
Params = Mapping[str, Any]
Samples = tuple[np.ndarray, np.ndarray]  # uint8 images (N, H, W, 3), labels (N,) or masks

# The paper's adapters and dummies per task when a transplant is not an experiment of it:
# Exp. 2's 3-conv 1×1 adapter for classification, Exp. 3's 1-conv 1×1 for segmentation.
DEFAULT_ADAPTERS = {"classification": (3, 1), "segmentation": (1, 1)}
DEFAULT_PROTOCOLS = {"classification": "exp2", "segmentation": "exp3"}
DEFAULT_LAMBDA0 = {"classification": 10.0, "segmentation": 1.0}


@dataclasses.dataclass(frozen=True)
class TransplantSettings:
    """How an adapter is learned: the engine's knobs.

    ``None`` fields take the task's default: adapter (num_convs, kernel) (3, 1) for
    classification and (1, 1) for segmentation; dummies Exp. 2's / Exp. 3's
    protocol (:func:`nettransplant.transplant.problem.task_dummies`); λ0 10 / 1.

    ``draws``: how the back-distillation draws are made (``"randomised"`` or
    ``"literal"``: :attr:`nettransplant.transplant.wiring.Transplant.draws`).
    """

    adapter: tuple[int, int] | None = None
    protocol: str | None = None
    lambda0: float | None = None
    positive_fraction: float = 0.2
    draws: Draws = "randomised"
    score_size: int = 7
    num_draws: int = 64
    draws_per_step: int = 4
    batch_size: int = 32
    learning_rate: float = 3e-3
    num_steps: int = 35
    closed_form_ridge: float = 1e-6
    closed_form_draws: int = 16
    warm_start: bool = True
    log_every: int = 5
    seed: int = 0

    def __post_init__(self):
        check_draws(self.draws)

    @classmethod
    def from_config(cls, transplant_config, *, seed: int = 0, **overrides) -> TransplantSettings:
        """From a main-job config's ``transplant`` section
        (``nettransplant/configs/silhouettes.py``)."""
        c = transplant_config
        values = dict(positive_fraction=c.positive_fraction, score_size=c.score_size,
                      num_draws=c.num_draws, draws_per_step=c.draws_per_step,
                      batch_size=c.batch_size, learning_rate=c.learning_rate,
                      num_steps=c.num_steps, closed_form_ridge=c.closed_form_ridge,
                      closed_form_draws=c.closed_form_draws, log_every=c.log_every, seed=seed)
        values.update(overrides)
        return cls(**values)

    def adapter_spec(self, task: str) -> tuple[int, int]:
        return tuple(self.adapter or DEFAULT_ADAPTERS[task])

    def protocol_for(self, task: str) -> str:
        return self.protocol or DEFAULT_PROTOCOLS[task]

    def lambda0_for(self, task: str) -> float:
        return float(self.lambda0 if self.lambda0 is not None else DEFAULT_LAMBDA0[task])


def build_problem(category: ModuleRef, student: ModuleRef, reference: ModuleRef,
                  adapter: Adapter, *, settings: TransplantSettings, image_size: int,
                  key: Array, beta: float, test_images: np.ndarray | None = None,
                  test_targets: np.ndarray | None = None) -> problem.TransplantProblem:
    """One transplant problem ``f → h → g_S`` with ``g_T`` beside it, from modules + params.

    Args:
      category, student, reference: ``f``, ``g_S`` and ``g_T`` with their parameters.
      adapter: ``h`` (its reorder, if any, is part of the problem).
      settings: dummies, draws, λ0 (:class:`TransplantSettings`).
      image_size: the training input side.
      key: seeds the draws and the adapter's random initialisation.
      beta: the re-scaling β.
      test_images: normalised test images (optional) and their ``test_targets``.
    """
    task = student.module.task.name
    transplant = Transplant(
        category_module=category.module, adapter=adapter, student_task_module=student.module,
        teacher_task_module=reference.module,
        task_dummy_relu=problem.task_dummies(settings.protocol_for(task), student.module),
        adapter_dummy_relu="identity", positive_fraction=settings.positive_fraction,
        draws=settings.draws)
    frozen = {"category_module": category.params, "student_task_module": student.params,
              "teacher_task_module": reference.params}
    return problem.make_problem(
        transplant, frozen, key=key, beta=beta, lambda0=settings.lambda0_for(task),
        num_draws=settings.num_draws, image_size=image_size, score_size=settings.score_size,
        test_images=test_images, test_targets=test_targets)


def warm_start_residual(prob: problem.TransplantProblem, warm_start: Params,
                        lambda0: float) -> float:
    """Back-distillation's loss at ``warm_start`` / λ0: the share of the teacher's
    pseudo-gradients the adapter leaves unexplained (0: matched, 1: nothing matched)."""
    return float(objectives.back_distill_term(prob.transplant, warm_start, prob.cache,
                                              prob.scalars)) / lambda0


def _features(module_ref: ModuleRef, images: np.ndarray) -> Array:
    return problem.features(module_ref.module, module_ref.params, images)


def estimate_beta(source: ModuleRef, source_images: np.ndarray, target: ModuleRef,
                  target_images: np.ndarray) -> float:
    """``β = E‖f_S(I_S)‖ / E‖f(I_T)‖`` from normalised unlabelled images (paper Sec. 3)."""
    return float(objectives.estimate_beta(_features(source, source_images),
                                          _features(target, target_images)))


def learn_adapter(category: ModuleRef, student: ModuleRef, reference: ModuleRef | None, *,
                  method: str, samples: tuple[np.ndarray, np.ndarray] | None, beta: float,
                  settings: TransplantSettings, image_size: int, key: Array | None = None,
                  steps: problem.StepCache | None = None, what: str = "adapter"
                  ) -> tuple[Adapter, Params, dict[str, Any]]:
    """Learn an adapter ``f → h → g_S`` with one method of the engine.

    Args:
      category: ``f``; student: ``g_S``; reference: ``g_T`` (None only for direct-learn).
      method: ``back-distill`` (works with 0 samples), ``direct-learn``, ``distill``, ``jacobian``.
      samples: normalised images and their labels or masks, or None (0 samples).
      beta: the re-scaling β.
      key: seeds draws, initialisation and batches (default from ``settings.seed``).
    Returns:
      ``(adapter, params, provenance)`` — provenance holds the method, sample
      count, α/β/λ, the warm-start residual, the live-draw fraction, the
      schedule and the final training loss.
    """
    task = student.module.task.name
    if method not in objectives.METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(objectives.METHODS)}")
    n = 0 if samples is None else int(len(samples[0]))
    if n == 0 and method != "back-distill":
        raise ValueError(f"{what}: {method} needs labelled samples; only back-distill learns "
                         "from 0")
    if reference is None:
        if method != "direct-learn":
            raise ValueError(f"{what}: {method} needs the teacher's task module (reference); "
                             "only direct-learn runs without one")
        reference = student  # its outputs are never used by direct-learn
    key = jax.random.key(settings.seed) if key is None else key
    num_convs, kernel = settings.adapter_spec(task)
    adapter = Adapter(category.module.output_channels(), num_convs, kernel, reorder_seed=None)
    prob = build_problem(category, student, reference, adapter, settings=settings,
                         image_size=image_size, key=key, beta=beta)
    lambda0 = settings.lambda0_for(task)
    provenance: dict[str, Any] = {
        "method": method, "samples": n, **prob.scalars.as_dict(), "lambda0": lambda0,
        "live_draw_fraction": prob.live_draw_fraction, "adapter": [num_convs, kernel],
        "num_steps": settings.num_steps, "learning_rate": settings.learning_rate}
    warm, exact = problem.zero_sample_solution(prob, ridge=settings.closed_form_ridge,
                                               num_draws=settings.closed_form_draws)
    provenance["warm_start_residual"] = warm_start_residual(prob, warm, lambda0)
    if method == "back-distill" and n == 0 and exact:
        provenance.update(solver="closed form", num_steps=0)
        return adapter, warm, provenance
    init = warm if method == "back-distill" and settings.warm_start else prob.adapter_init
    provenance["init"] = "closed-form warm start" if init is warm else "random"
    data = None
    if n:
        data = problem.transfer_data(prob, samples[0], samples[1],
                                     key=jax.random.fold_in(key, n),
                                     pad_to=max(settings.batch_size, n))
    steps = steps or problem.StepCache(optax.adam(settings.learning_rate))
    params, history, _ = problem.fit(
        prob, method, steps, data=data, num_samples=n, init=init,
        num_steps=settings.num_steps, batch_size=settings.batch_size,
        draws_per_step=settings.draws_per_step, seed=settings.seed + n,
        log_every=settings.log_every)
    if history:
        provenance["final_loss"] = history[-1]["loss"]
    if n:
        provenance["train_fit"] = problem.training_fit(prob, params, data, n)
    return adapter, params, provenance


def _normalised(net: TransplantNet, category: str, images: np.ndarray) -> np.ndarray:
    return net.normalize(images, category=category)


def _beta(net: TransplantNet, onto: str, target: ModuleRef, beta: float | None,
          beta_images: tuple[np.ndarray, np.ndarray] | None, target_input) -> float:
    """β given, or estimated against the category module that feeds ``onto`` directly."""
    if beta is not None:
        return float(beta)
    if beta_images is None:
        raise ValueError(f"transplanting onto {onto!r} needs beta or beta_images=(images of "
                         "the categories it serves, images of the new category)")
    homes = net.direct_categories(onto)
    if not homes:
        raise ValueError(f"task module {onto!r} has no directly connected category module to "
                         "estimate β against; pass beta")
    source = net.category_ref(homes[0])
    return estimate_beta(source, _normalised(net, homes[0], beta_images[0]), target,
                         target_input.normalize(beta_images[1]))


def _test_report(net: TransplantNet, category: str, task_module: str,
                 test: Samples | None) -> dict[str, float]:
    if test is None:
        return {}
    task = net.task_module(task_module).task
    return {task.metric_name: net.evaluate(test[0], test[1], category=category,
                                           task=task_module)}


def transplant(net: TransplantNet, teacher: TeacherParts, *, onto: str,
               method: str = "back-distill", samples: Samples | None = None,
               beta: float | None = None,
               beta_images: tuple[np.ndarray, np.ndarray] | None = None,
               settings: TransplantSettings | None = None, test: Samples | None = None,
               key: Array | None = None) -> tuple[TransplantNet, dict[str, Any]]:
    """Transplant ``teacher``'s category module onto the net's task module ``onto``.

    Args:
      teacher: the teacher net; its task module for ``onto``'s task is ``g_T``.
      onto: the task module ``g_S`` (already in the net).
      method: any method of the engine; ``back-distill`` also learns from 0 samples.
      samples: uint8 labelled images of the teacher's category and their
        labels / masks (None: 0 samples).
      beta: the re-scaling; or ``beta_images`` = (uint8 images of the categories
        ``onto`` already serves, uint8 images of the new category) to estimate it.
      settings: the engine's knobs (:class:`TransplantSettings`).
      test: optional labelled uint8 images to score the new route on.
    Returns:
      ``(net, report)``: the net with the teacher's category module, the new
      adapter ``teacher.name → onto`` and the teacher's other task modules
      (``<teacher>.<task>``, wired directly); the report is the adapter's
      provenance plus the test metric.
    """
    settings = settings or TransplantSettings()
    g_s = net.task_module(onto)
    task = g_s.task.name
    reference = teacher.task_module(task)
    grown = net.add_category_module(teacher.name, teacher.category_module.module,
                                    teacher.category_module.params, input=teacher.input,
                                    provenance=teacher.provenance)
    for other, ref in teacher.task_modules.items():
        if other != task:  # the teacher's other task modules join, wired to its category
            grown = grown.add_task_module(f"{teacher.name}.{other}", ref.module, ref.params,
                                          provenance={**teacher.provenance,
                                                      "categories": [teacher.name]},
                                          connect=[teacher.name])
    b = _beta(net, onto, teacher.category_module, beta, beta_images, teacher.input)
    data = None if samples is None or len(samples[0]) == 0 else (
        teacher.input.normalize(samples[0]), np.asarray(samples[1]))
    adapter, params, provenance = learn_adapter(
        teacher.category_module, net.task_ref(onto), reference, method=method, samples=data,
        beta=b, settings=settings, image_size=teacher.input.size, key=key,
        what=f"transplant {teacher.name} → {onto}")
    provenance = {"operation": "transplant", "teacher": dict(teacher.provenance),
                  **provenance}
    grown = grown.add_adapter(teacher.name, onto, adapter, params, beta=b,
                              provenance=provenance)
    metrics = _test_report(grown, teacher.name, onto, test)
    if metrics:
        provenance["metrics"] = metrics
        grown = _with_edge_provenance(grown, teacher.name, onto, provenance)
    return grown, provenance


def _with_edge_provenance(net: TransplantNet, category: str, task_module: str,
                          provenance: Mapping[str, Any]) -> TransplantNet:
    edges = dict(net.edges)
    edge = edges[category, task_module]
    edges[category, task_module] = dataclasses.replace(edge, provenance=dict(provenance))
    return TransplantNet(net.category_modules, net.task_modules, edges, net.params)


def connect(net: TransplantNet, category: str, task_module: str, *,
            reference: str | None = None, method: str = "back-distill",
            samples: Samples | None = None, beta: float | None = None,
            beta_images: tuple[np.ndarray, np.ndarray] | None = None,
            settings: TransplantSettings | None = None, test: Samples | None = None,
            key: Array | None = None) -> tuple[TransplantNet, dict[str, Any]]:
    """Connect the net's ``category`` to its ``task_module`` with a new adapter (Step 3).

    Args:
      reference: the task module serving as ``g_T`` — one wired *directly* to
        ``category`` for the same task (default: the only such module; needed
        by every method but direct-learn).
      Other arguments as :func:`transplant`.
    Returns:
      ``(net, report)`` with the adapter ``category → task_module``.
    """
    settings = settings or TransplantSettings()
    g_s = net.task_module(task_module)
    f = net.category_ref(category)
    if (category, task_module) in net.edges:
        raise ValueError(f"category {category!r} is already connected to {task_module!r}")
    task = g_s.task.name
    ref = None
    if reference is None:
        own = net.task_modules_of(category, task, direct=True)
        if len(own) == 1:
            reference = own[0]
        elif method != "direct-learn":
            raise ValueError(
                f"connect {category} → {task_module} by {method} needs a reference {task} "
                f"module wired directly to {category!r} (g_T); found {own or 'none'}: pass "
                "reference= or use method='direct-learn'")
    if reference is not None:
        if reference not in net.task_modules_of(category, direct=True):
            raise ValueError(f"reference {reference!r} is not wired directly to {category!r}")
        if net.task_module(reference).task.name != task:
            raise ValueError(f"reference {reference!r} solves "
                             f"{net.task_module(reference).task.name}, not {task}")
        ref = net.task_ref(reference)
    spec = net.category(category).input
    b = _beta(net, task_module, f, beta, beta_images, spec)
    data = None if samples is None or len(samples[0]) == 0 else (
        spec.normalize(samples[0]), np.asarray(samples[1]))
    adapter, params, provenance = learn_adapter(
        f, net.task_ref(task_module), ref, method=method, samples=data, beta=b,
        settings=settings, image_size=spec.size, key=key,
        what=f"connect {category} → {task_module}")
    provenance = {"operation": "connect", "reference": reference, **provenance}
    grown = net.add_adapter(category, task_module, adapter, params, beta=b,
                            provenance=provenance)
    metrics = _test_report(grown, category, task_module, test)
    if metrics:
        provenance["metrics"] = metrics
        grown = _with_edge_provenance(grown, category, task_module, provenance)
    return grown, provenance


def _route_features(net: TransplantNet, category: str, task_module: str | None,
                    images: np.ndarray) -> np.ndarray:
    """``f(I)``, or ``h(f(I))`` when ``category`` reaches ``task_module`` through an adapter."""
    x = _features(net.category_ref(category), net.normalize(images, category=category))
    if task_module is None or (category, task_module) not in net.edges:
        return np.asarray(x)
    edge = net.edge(category, task_module)
    if edge.adapter is None:
        return np.asarray(x)
    h = net.adapter_params(category, task_module)
    return np.asarray(_adapt(edge.adapter, h, jnp.float32(edge.beta), x))


@partial(jax.jit, static_argnums=0)
def _adapt(adapter: Adapter, params, beta, x):
    return adapter.apply({"params": params}, x, beta=beta)[0]


def _labelled_union(net: TransplantNet, data: Mapping[str, Samples], task_module: str | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    if not data:
        raise ValueError("no labelled samples: data must map categories to (images, targets)")
    xs, ys = [], []
    for category, (images, targets) in data.items():
        if len(images) != len(targets):
            raise ValueError(f"category {category!r}: {len(images)} images but "
                             f"{len(targets)} targets")
        xs.append(_route_features(net, category, task_module, images))
        ys.append(np.asarray(targets).astype(np.int32))
    return np.concatenate(xs), np.concatenate(ys)


def add_task(net: TransplantNet, task_module: str, module: TaskModule, *,
             data: Mapping[str, Samples], init: Params | None = None,
             settings: TaskTrainingSettings | None = None,
             provenance: Mapping[str, Any] | None = None
             ) -> tuple[TransplantNet, dict[str, Any]]:
    """Learn a new task module on the frozen features of one or more category modules.

    Args:
      task_module: the new module's id.
      module: its architecture (a classification or segmentation task module
        whose input channels match the category modules').
      data: ``{category: (uint8 images, labels or masks)}`` — the categories
        it will serve, each wired to it directly.
      init: starting parameters (default: ``module.init`` from ``settings.seed``).
    Returns:
      ``(net, report)``; the report holds the schedule and the final loss.
    """
    settings = settings or TaskTrainingSettings()
    for category in data:
        channels = net.category(category).module.output_channels()
        if channels != module.input_channels():
            raise ValueError(f"task module {task_module!r} takes {module.input_channels()} "
                             f"channels but category module {category!r} outputs {channels}")
    x, y = _labelled_union(net, data, None)
    if init is None:
        init = module.init(jax.random.key(settings.seed), jnp.zeros((1, *x.shape[1:])))["params"]
    params, history = train_task_module(module, init, x, y, settings,
                                         f"add task module {task_module}")
    report = {"operation": "add_task", "categories": sorted(data), "samples": int(len(y)),
              "num_steps": settings.num_steps, "learning_rate": settings.learning_rate,
              "final_loss": history[-1]["loss"] if history else None,
              **dict(provenance or {})}
    return net.add_task_module(task_module, module, params, provenance=report,
                               connect=sorted(data)), report


def fine_tune(net: TransplantNet, task_module: str, *, data: Mapping[str, Samples],
              settings: TaskTrainingSettings | None = None
              ) -> tuple[TransplantNet, dict[str, Any]]:
    """Train ``task_module`` further on routes of several categories (adapters stay fixed).

    Every route through the module changes; the routes of categories not in
    ``data`` may forget what they did — measure it with
    :meth:`TransplantNet.evaluate` on both nets.

    Args:
      data: ``{category: (uint8 images, targets)}``; each category must be
        connected to ``task_module`` (directly or through an adapter).
    Returns:
      ``(net, report)``.
    """
    settings = settings or TaskTrainingSettings()
    for category in data:
        net.edge(category, task_module)
    x, y = _labelled_union(net, data, task_module)
    node = net.task_module(task_module)
    params, history = train_task_module(node.module, net.task_params(task_module), x, y,
                                         settings, f"fine-tune {task_module}")
    report = {"operation": "fine_tune", "categories": sorted(data), "samples": int(len(y)),
              "num_steps": settings.num_steps, "learning_rate": settings.learning_rate,
              "final_loss": history[-1]["loss"] if history else None}
    provenance = {**node.provenance, "fine_tuned": [*node.provenance.get("fine_tuned", []),
                                                    report]}
    return net.with_task_params(task_module, params, provenance), report


def rank_task_modules(net: TransplantNet, teacher: TeacherParts, *, task: str,
                      candidates: Sequence[str] | None = None,
                      beta_images: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                      betas: Mapping[str, float] | None = None,
                      settings: TransplantSettings | None = None, key: Array | None = None
                      ) -> list[dict[str, Any]]:
    """Rank the net's ``task`` modules as targets for ``teacher``'s category module.

    Each candidate ``g_S`` gets a single 1×1-conv adapter solved in closed form
    for the zero-sample back-distillation objective with the teacher's own task
    module as ``g_T``; its loss / λ0 (the residual) is the share of the
    teacher's pseudo-gradients no adapter of that form reproduces. Lower is a
    better candidate (the paper leaves choosing the task module open; this is
    the library's proxy — measured against transplant errors by the main job).

    Args:
      candidates: task module ids (default: every ``task`` module in the net).
      beta_images / betas: per candidate, images to estimate β or β itself.
    Returns:
      ``[{"task_module": id, "residual": r, "beta": β}, …]`` sorted by residual.
    """
    settings = dataclasses.replace(settings or TransplantSettings(), adapter=(1, 1))
    candidates = list(candidates) if candidates is not None else sorted(
        t for t, node in net.task_modules.items() if node.task.name == task)
    reference = teacher.task_module(task)
    ranking = []
    for candidate in candidates:
        if net.task_module(candidate).task.name != task:
            raise ValueError(f"candidate {candidate!r} solves "
                             f"{net.task_module(candidate).task.name}, not {task}")
        b = _beta(net, candidate, teacher.category_module, (betas or {}).get(candidate),
                  (beta_images or {}).get(candidate), teacher.input)
        adapter = Adapter(teacher.category_module.module.output_channels(), 1, 1)
        prob = build_problem(teacher.category_module, net.task_ref(candidate), reference,
                             adapter, settings=settings, image_size=teacher.input.size,
                             key=jax.random.key(settings.seed) if key is None else key, beta=b)
        warm, _ = problem.zero_sample_solution(prob, ridge=settings.closed_form_ridge,
                                               num_draws=settings.closed_form_draws)
        ranking.append({"task_module": candidate, "beta": b, "residual": warm_start_residual(
            prob, warm, settings.lambda0_for(task))})
    return sorted(ranking, key=lambda r: r["residual"])
