"""The transplant net: named category modules, named task modules, adapters as edges.

A :class:`TransplantNet` is the paper's object (Fig. 1): category modules
``f`` (one per category), task modules ``g`` (each knows its task:
:mod:`nettransplant.core.tasks`), and edges ``f → g``, each either direct (the
teacher's own pairing) or through a learned adapter ``h`` (with its fixed
re-scaling β). A *route* is a connected (category, task module) pair;
:meth:`TransplantNet.apply` runs ``g(h(f(I)))`` on it and
:meth:`TransplantNet.predict` turns the outputs into labels or masks.

Parameters are stored by module id::

    {"category_modules": {id: params}, "task_modules": {id: params},
     "adapters": {category id: {task module id: params}}}

A net is immutable: every operation (the functions of
:mod:`nettransplant.net.operations`, which take the net first) returns a new net that
shares every existing module's parameter arrays, so an operation cannot change any route
that existed before it (tested bitwise). Ids are names like ``cat`` or ``dog.segmentation``
(letters, digits, ``_``, ``.``, ``-``).
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nettransplant.core import evaluation, tasks
from nettransplant.core.adapter import Adapter
from nettransplant.core.modules import (
    CategoryModule,
    ClassificationTaskModule,
    SegmentationTaskModule,
    Teacher,
)
from nettransplant.data.tasks import IMAGENET_MEAN, IMAGENET_STD

Array = jax.Array
Params = Mapping[str, Any]
TaskModule = ClassificationTaskModule | SegmentationTaskModule

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
CATEGORY_MODULES, TASK_MODULES, ADAPTERS = "category_modules", "task_modules", "adapters"


def check_id(module_id: str, what: str) -> str:
    """``module_id`` if it is a valid id; a ValueError naming it otherwise."""
    if not isinstance(module_id, str) or not ID_PATTERN.fullmatch(module_id):
        raise ValueError(f"{what} id {module_id!r} is not valid: use letters, digits, '_', '.' "
                         "and '-', starting with a letter or digit")
    return module_id


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The images a category module was trained on: side and normalisation.

    ``normalize`` maps uint8 RGB ``(N, size, size, 3)`` to the network input
    ``(x / 255 − mean) / std`` (ImageNet statistics by default, as torchvision's VGG-16).
    """

    size: int
    mean: tuple[float, float, float] = tuple(float(v) for v in IMAGENET_MEAN)
    std: tuple[float, float, float] = tuple(float(v) for v in IMAGENET_STD)

    def check(self, shape: Sequence[int], what: str = "images") -> None:
        """A ValueError naming ``what`` unless ``shape`` is ``(N, size, size, 3)``."""
        shape = tuple(shape)
        expected = f"(N, {self.size}, {self.size}, 3)"
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{what} must be RGB images {expected}, got shape {shape}")
        if shape[1:3] != (self.size, self.size):
            raise ValueError(f"{what} are {shape[1]}×{shape[2]}; this category module was "
                             f"trained on {self.size}×{self.size} images {expected}")

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images → float32 network input."""
        self.check(np.shape(images))
        if np.asarray(images).dtype != np.uint8:
            raise ValueError(f"images must be uint8 RGB (0..255), got {np.asarray(images).dtype}"
                             "; TransplantNet.apply takes already-normalised inputs")
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        return ((np.asarray(images, np.float32) / 255.0 - mean) / std).astype(np.float32)


def _frozen(mapping: Mapping | None) -> Mapping:
    return types.MappingProxyType(dict(mapping or {}))


@dataclasses.dataclass(frozen=True)
class CategoryNode:
    """A category module with its input and where it came from."""

    module: CategoryModule
    input: InputSpec
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TaskNode:
    """A task module and where it came from."""

    module: TaskModule
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def task(self) -> tasks.Task:
        return self.module.task


@dataclasses.dataclass(frozen=True)
class Edge:
    """``category → task module``: direct (``adapter`` None) or through an adapter."""

    adapter: Adapter | None = None
    beta: float = 1.0
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Route:
    """A connected (category, task module) pair."""

    category: str
    task_module: str
    task: str
    adapter: bool


@dataclasses.dataclass(frozen=True)
class ModuleRef:
    """A module and its parameters outside any net (e.g. a teacher's own task module)."""

    module: nn.Module
    params: Params


@dataclasses.dataclass(frozen=True)
class TeacherParts:
    """A pre-trained teacher net: one category module and its task modules, by task name.

    :meth:`from_teacher` splits a :class:`~nettransplant.core.modules.Teacher`;
    :func:`nettransplant.net.io.load_teacher` reads a teacher checkpoint.
    """

    name: str
    category_module: ModuleRef
    task_modules: Mapping[str, ModuleRef]
    input: InputSpec
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_teacher(cls, name: str, teacher: Teacher, params: Params, *, input_size: int,
                     provenance: Mapping[str, Any] | None = None) -> TeacherParts:
        modules = {"classification": ModuleRef(teacher.classification_module,
                                               params["classification_module"]),
                   "segmentation": ModuleRef(teacher.segmentation_module,
                                             params["segmentation_module"])}
        return cls(name, ModuleRef(teacher.category_module, params["category_module"]),
                   modules, InputSpec(input_size), dict(provenance or {}))

    def task_module(self, task: str) -> ModuleRef:
        if task not in self.task_modules:
            raise ValueError(f"teacher {self.name!r} has no {task} module; it has "
                             f"{sorted(self.task_modules)}")
        return self.task_modules[task]


@partial(jax.jit, static_argnums=(0, 1, 2))
def _route_forward(category_module, adapter, task_module, f_params, h_params, beta,
                   g_params, images):
    x = category_module.apply({"params": f_params}, images)[0]
    if adapter is not None:
        x = adapter.apply({"params": h_params}, x, beta=beta)[0]
    return task_module.apply({"params": g_params}, x)[0]


@partial(jax.jit, static_argnums=(0, 1, 2))
def _route_predict(category_module, adapter, task_module, f_params, h_params, beta, g_params,
                   images):
    y = _route_forward(category_module, adapter, task_module, f_params, h_params, beta,
                       g_params, images)
    return task_module.task.predict(y)


class TransplantNet:
    """Category modules, task modules and adapters (see the module docstring).

    Build one with :meth:`add_teacher` and grow it with the functions of
    :mod:`nettransplant.net.operations` (``transplant``, ``connect``, ``add_task``,
    ``fine_tune``), which take the net first; save it with
    :func:`nettransplant.net.io.export_net`.
    """

    def __init__(self, category_modules: Mapping[str, CategoryNode] | None = None,
                 task_modules: Mapping[str, TaskNode] | None = None,
                 edges: Mapping[tuple[str, str], Edge] | None = None,
                 params: Mapping[str, Any] | None = None):
        self._categories = dict(category_modules or {})
        self._tasks = dict(task_modules or {})
        self._edges = dict(edges or {})
        params = params or {}
        self._params = {CATEGORY_MODULES: dict(params.get(CATEGORY_MODULES, {})),
                        TASK_MODULES: dict(params.get(TASK_MODULES, {})),
                        ADAPTERS: {c: dict(v) for c, v in params.get(ADAPTERS, {}).items()}}
        self._check()

    # ------------------------------------------------------------------ structure

    def _check(self) -> None:
        for cid in self._categories:
            check_id(cid, "category module")
            if cid not in self._params[CATEGORY_MODULES]:
                raise ValueError(f"category module {cid!r} has no parameters")
        for tid in self._tasks:
            check_id(tid, "task module")
            if tid not in self._params[TASK_MODULES]:
                raise ValueError(f"task module {tid!r} has no parameters")
        for (cid, tid), edge in self._edges.items():
            if cid not in self._categories:
                raise ValueError(f"edge {cid} → {tid}: no category module {cid!r}")
            if tid not in self._tasks:
                raise ValueError(f"edge {cid} → {tid}: no task module {tid!r}")
            has = tid in self._params[ADAPTERS].get(cid, {})
            if (edge.adapter is not None) != has:
                raise ValueError(f"edge {cid} → {tid}: adapter and adapter parameters disagree")

    @property
    def category_modules(self) -> Mapping[str, CategoryNode]:
        return _frozen(self._categories)

    @property
    def task_modules(self) -> Mapping[str, TaskNode]:
        return _frozen(self._tasks)

    @property
    def edges(self) -> Mapping[tuple[str, str], Edge]:
        return _frozen(self._edges)

    @property
    def params(self) -> dict[str, Any]:
        """The parameter tree by module id (a fresh dict; the arrays are shared)."""
        return {CATEGORY_MODULES: dict(self._params[CATEGORY_MODULES]),
                TASK_MODULES: dict(self._params[TASK_MODULES]),
                ADAPTERS: {c: dict(v) for c, v in self._params[ADAPTERS].items() if v}}

    def routes(self) -> list[Route]:
        """Every connected (category, task module) pair, sorted."""
        return [Route(c, t, self._tasks[t].task.name, e.adapter is not None)
                for (c, t), e in sorted(self._edges.items())]

    def category(self, category: str) -> CategoryNode:
        if category not in self._categories:
            raise KeyError(f"no category module {category!r}; the net has "
                           f"{sorted(self._categories) or 'none'}")
        return self._categories[category]

    def task_module(self, task_module: str) -> TaskNode:
        if task_module not in self._tasks:
            raise KeyError(f"no task module {task_module!r}; the net has "
                           f"{sorted(self._tasks) or 'none'}")
        return self._tasks[task_module]

    def edge(self, category: str, task_module: str) -> Edge:
        self.category(category)
        self.task_module(task_module)
        if (category, task_module) not in self._edges:
            connected = sorted(t for c, t in self._edges if c == category)
            raise KeyError(f"category {category!r} is not connected to task module "
                           f"{task_module!r}; it is connected to {connected or 'nothing'}")
        return self._edges[category, task_module]

    def category_params(self, category: str) -> Params:
        self.category(category)
        return self._params[CATEGORY_MODULES][category]

    def task_params(self, task_module: str) -> Params:
        self.task_module(task_module)
        return self._params[TASK_MODULES][task_module]

    def adapter_params(self, category: str, task_module: str) -> Params | None:
        self.edge(category, task_module)
        return self._params[ADAPTERS].get(category, {}).get(task_module)

    def category_ref(self, category: str) -> ModuleRef:
        return ModuleRef(self.category(category).module, self.category_params(category))

    def task_ref(self, task_module: str) -> ModuleRef:
        return ModuleRef(self.task_module(task_module).module, self.task_params(task_module))

    def direct_categories(self, task_module: str) -> list[str]:
        """The categories wired to ``task_module`` without an adapter (its own teachers)."""
        return sorted(c for (c, t), e in self._edges.items()
                      if t == task_module and e.adapter is None)

    def task_modules_of(self, category: str, task: str | None = None, *,
                        direct: bool | None = None) -> list[str]:
        """Task modules ``category`` is connected to (of one task; direct or via adapters)."""
        return sorted(t for (c, t), e in self._edges.items() if c == category
                      and (task is None or self._tasks[t].task.name == task)
                      and (direct is None or (e.adapter is None) == direct))

    def module_sizes(self) -> dict[str, dict[str, int]]:
        """Parameter counts per module id (category modules, task modules, adapters)."""
        def count(tree):
            return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))
        p = self._params
        return {CATEGORY_MODULES: {k: count(v) for k, v in p[CATEGORY_MODULES].items()},
                TASK_MODULES: {k: count(v) for k, v in p[TASK_MODULES].items()},
                ADAPTERS: {f"{c}->{t}": count(v) for c, ts in p[ADAPTERS].items()
                           for t, v in ts.items()}}

    # ------------------------------------------------------------------ running

    def _route(self, category: str, task_module: str) -> tuple:
        edge = self.edge(category, task_module)
        return ((self._categories[category].module, edge.adapter,
                 self._tasks[task_module].module),
                (self._params[CATEGORY_MODULES][category],
                 self._params[ADAPTERS].get(category, {}).get(task_module),
                 jnp.float32(edge.beta), self._params[TASK_MODULES][task_module]))

    def apply(self, images: Array | np.ndarray, *, category: str, task: str) -> Array:
        """``g(h(f(I)))`` on the route ``category → task``: logits or score maps.

        Args:
          images: the network input, ``(B, H, W, 3)`` float32 normalised as the
            category module expects (:meth:`normalize`).
          category: a category module id.
          task: a task module id connected to it.
        Returns:
          ``(B, S, S, K)`` classification score maps or ``(B, H, W, C)`` segmentation scores.
        """
        modules, params = self._route(category, task)
        x = jnp.asarray(images)
        self._categories[category].input.check(x.shape, "inputs")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"apply takes normalised float inputs, got {x.dtype}; "
                             "predict takes uint8 images")
        return _route_forward(*modules, *params, x)

    def normalize(self, images: np.ndarray, *, category: str) -> np.ndarray:
        """uint8 RGB images → the input of ``category``'s module."""
        return self.category(category).input.normalize(images)

    def predict(self, images: np.ndarray, *, category: str, task: str,
                batch_size: int = 256) -> np.ndarray:
        """Labels ``(N,)`` or masks ``(N, H, W)`` of uint8 RGB images ``(N, H, W, 3)``.

        Images are normalised as the category module was trained, then run in
        fixed-size batches (one compiled shape).
        """
        modules, params = self._route(category, task)
        x = self.normalize(images, category=category)
        return evaluation.batched_apply(lambda b: _route_predict(*modules, *params, b), x,
                                        batch_size=batch_size)

    def evaluate(self, images: np.ndarray, targets: np.ndarray, *, category: str,
                 task: str) -> float:
        """The task's metric (error % or pixel accuracy %) of a route on labelled images."""
        return self.task_module(task).task.metric(
            self.predict(images, category=category, task=task), targets)

    # ------------------------------------------------------------------ growth

    def _grown(self, *, categories: Mapping[str, CategoryNode] = types.MappingProxyType({}),
               task_modules: Mapping[str, TaskNode] = types.MappingProxyType({}),
               edges: Mapping[tuple[str, str], Edge] = types.MappingProxyType({}),
               params: Mapping[str, Any] | None = None,
               replace_tasks: Mapping[str, tuple[TaskNode, Params]] | None = None
               ) -> TransplantNet:
        """A new net with the given additions; existing modules must not be redefined."""
        for cid in categories:
            check_id(cid, "category module")
            if cid in self._categories:
                raise ValueError(f"the net already has a category module {cid!r}")
        for tid in task_modules:
            check_id(tid, "task module")
            if tid in self._tasks:
                raise ValueError(f"the net already has a task module {tid!r}")
        for key in edges:
            if key in self._edges:
                raise ValueError(f"category {key[0]!r} is already connected to {key[1]!r}")
        new_params = self.params
        for kind in (CATEGORY_MODULES, TASK_MODULES):
            new_params[kind].update((params or {}).get(kind, {}))
        for c, ts in (params or {}).get(ADAPTERS, {}).items():
            new_params[ADAPTERS].setdefault(c, {}).update(ts)
        nodes = dict(self._tasks)
        for tid, (node, p) in (replace_tasks or {}).items():
            nodes[tid] = node
            new_params[TASK_MODULES][tid] = p
        return TransplantNet({**self._categories, **categories}, {**nodes, **task_modules},
                             {**self._edges, **edges}, new_params)

    def add_category_module(self, category: str, module: CategoryModule, params: Params, *,
                            input: InputSpec, provenance: Mapping | None = None
                            ) -> TransplantNet:
        """A new net with one more (unconnected) category module."""
        return self._grown(categories={category: CategoryNode(module, input,
                                                              dict(provenance or {}))},
                           params={CATEGORY_MODULES: {category: params}})

    def add_task_module(self, task_module: str, module: TaskModule, params: Params, *,
                        provenance: Mapping | None = None,
                        connect: Sequence[str] = ()) -> TransplantNet:
        """A new net with one more task module, wired directly to the ``connect`` categories."""
        for c in connect:
            self.category(c)
        return self._grown(task_modules={task_module: TaskNode(module, dict(provenance or {}))},
                           edges={(c, task_module): Edge() for c in connect},
                           params={TASK_MODULES: {task_module: params}})

    def add_adapter(self, category: str, task_module: str, adapter: Adapter, params: Params, *,
                    beta: float, provenance: Mapping | None = None) -> TransplantNet:
        """A new net with ``category → adapter → task_module`` (an adapter learned elsewhere)."""
        self.category(category)
        self.task_module(task_module)
        return self._grown(edges={(category, task_module): Edge(adapter, float(beta),
                                                                dict(provenance or {}))},
                           params={ADAPTERS: {category: {task_module: params}}})

    def add_teacher(self, teacher: TeacherParts, *, tasks: Sequence[str] | None = None,
                    ) -> TransplantNet:
        """A new net with a teacher's category module and its task modules, wired directly.

        Task modules get ids ``<teacher>.<task>`` (``dog.classification``);
        ``tasks`` picks some of them (default: all).
        """
        chosen = list(teacher.task_modules) if tasks is None else list(tasks)
        net = self.add_category_module(teacher.name, teacher.category_module.module,
                                       teacher.category_module.params, input=teacher.input,
                                       provenance=teacher.provenance)
        for task in chosen:
            ref = teacher.task_module(task)
            net = net.add_task_module(f"{teacher.name}.{task}", ref.module, ref.params,
                                      provenance={**teacher.provenance,
                                                  "categories": [teacher.name]},
                                      connect=[teacher.name])
        return net

    def with_task_params(self, task_module: str, params: Params,
                         provenance: Mapping | None = None) -> TransplantNet:
        """A new net whose ``task_module`` has new parameters (fine-tuning)."""
        node = self.task_module(task_module)
        new = TaskNode(node.module, dict(node.provenance if provenance is None else provenance))
        return self._grown(replace_tasks={task_module: (new, params)})

    def __repr__(self) -> str:
        return (f"TransplantNet({len(self._categories)} category modules, "
                f"{len(self._tasks)} task modules, {len(self._edges)} routes)")
