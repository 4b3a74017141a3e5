"""Teacher training: one category module with a classification and a segmentation task module.

The two task modules share the category module (paper Fig. 4a) and are trained
jointly: ``loss = BCE(classification) + CE(segmentation, per pixel)``. A
generic (e.g. leave-one-out) task module is trained the same way on the union
of several categories.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nettransplant.core.modules import Teacher
from nettransplant.runtime import parallel
from nettransplant.training.loop import (
    IndexStream,
    NonFiniteError,
    TrainState,
    guarded_update,
    train_loop,
)

LOG_EVERY = 50  # teacher steps between logged metrics

Array = jax.Array
Params = Mapping[str, Any]


def create_teacher_state(teacher: Teacher, key: Array, image_size: int,
                         optimizer: optax.GradientTransformation) -> TrainState:
    """Fresh teacher parameters (seeded) and optimizer state."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params = teacher.init({"params": key}, images)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_teacher_step(teacher: Teacher, optimizer: optax.GradientTransformation, *,
                      mesh: jax.sharding.Mesh | None = None,
                      compute_dtype: jnp.dtype | None = None):
    """Jitted ``step(state, key, cls_images, cls_labels, seg_images, seg_masks)``.

    Data parallel over ``mesh`` (default: every device on one ``data`` axis,
    :mod:`nettransplant.runtime.parallel`): the state is replicated and comes back
    replicated (donated), the image batches ``(B, H, W, 3)`` / ``(B_seg, H, W, 3)``
    and their labels are split over ``data`` (B and B_seg must divide by its
    size); the losses are means over the whole batch, so the gradient is the
    one-device gradient, all-reduced by XLA.

    ``compute_dtype`` (e.g. ``jnp.bfloat16``): mixed precision — the forward and
    backward passes run in that dtype on a cast of the float32 parameters, which
    the optimizer updates; the losses are computed in float32. None: float32.
    """
    mesh = mesh or parallel.data_mesh()

    def loss_fn(params, key, cls_images, cls_labels, seg_images, seg_masks):
        if compute_dtype is not None:  # the cast's VJP brings the gradients back to float32
            params, cls_images, seg_images = jax.tree.map(
                lambda a: a.astype(compute_dtype), (params, cls_images, seg_images))
        variables = {"params": params}
        rngs = {"dropout": key}
        y_cls = teacher.apply(variables, cls_images, train=True, rngs=rngs,
                              method=_classification_forward).astype(jnp.float32)
        y_seg = teacher.apply(variables, seg_images, train=True, rngs=rngs,
                              method=_segmentation_forward).astype(jnp.float32)
        ones_cls = jnp.ones((cls_images.shape[0],), jnp.float32)
        ones_seg = jnp.ones((seg_images.shape[0],), jnp.float32)
        terms = {"classification": teacher.classification_module.task.loss(
                     y_cls, cls_labels, ones_cls),
                 "segmentation": teacher.segmentation_module.task.loss(
                     y_seg, seg_masks, ones_seg)}
        return sum(terms.values()), terms

    @partial(jax.jit, donate_argnums=0, out_shardings=parallel.replicated(mesh))
    def sharded_step(state: TrainState, key, cls_images, cls_labels, seg_images, seg_masks):
        parallel.check_divisible("teacher batch size", cls_images.shape[0], mesh)
        parallel.check_divisible("teacher segmentation batch size", seg_images.shape[0], mesh)
        cls_images, cls_labels, seg_images, seg_masks = parallel.constrain_batch(
            (cls_images, cls_labels, seg_images, seg_masks), mesh)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, key, cls_images, cls_labels, seg_images, seg_masks)
        new_state, grad_norm, finite = guarded_update(state, grads, loss, optimizer)
        return new_state, {"loss": loss, **terms, "grad_norm": grad_norm, "finite": finite}

    return parallel.state_enters_replicated(sharded_step, mesh)


def _classification_forward(teacher: Teacher, images, train=False):
    x, _ = teacher.category_module(images, train=train)
    return teacher.classification_module(x, train=train)[0]


def _segmentation_forward(teacher: Teacher, images, train=False):
    x, _ = teacher.category_module(images, train=train)
    return teacher.segmentation_module(x, train=train)[0]


def train_teacher(teacher: Teacher, state: TrainState, *, cls_images: np.ndarray,
                  cls_labels: np.ndarray, seg_images: np.ndarray, seg_masks: np.ndarray,
                  optimizer: optax.GradientTransformation, num_steps: int, batch_size: int,
                  seed: int, progress: bool | str = True,
                  history: list[dict[str, float]] | None = None,
                  checkpoint_every: int = 0,
                  on_checkpoint: Callable[[TrainState, list[dict[str, float]]], None] | None = None,
                  step_fn: Callable | None = None,
                  seg_batch_size: int | None = None, writer=None, what: str = "train teacher",
                  mesh: jax.sharding.Mesh | None = None,
                  ) -> tuple[TrainState, list[dict[str, float]]]:
    """Train from ``state`` for ``num_steps - state.step`` more steps (resumable).

    Batches are drawn by a seeded stream, replayed deterministically from step 0
    when resuming, so an interrupted and resumed run equals an uninterrupted one.

    Args:
      history: the metrics logged before ``state`` (resuming); extended in place.
      checkpoint_every: call ``on_checkpoint(state, history)`` after every this
        many steps (not after the last: the caller saves the final state).
      step_fn: a step from :func:`make_teacher_step` for this teacher and
        optimizer, to reuse one compilation across teachers of one shape.
      seg_batch_size: segmentation images per step (default ``batch_size``);
        a segmentation image costs about twice a classification image here.
      writer: a metric writer for the logged steps.
      what: names the teacher in progress and errors.
      mesh: the devices to train on, data parallel (``step_fn`` must be made for
        the same mesh); default every device. Each process loads only its rows
        of each batch; ``on_checkpoint`` gets the replicated (global) state, so
        a multi-process save is collective; the returned state is host-local.
    Raises:
      NonFiniteError: a non-finite loss or gradient (the state holds only finite updates).
    """
    mesh = mesh or parallel.data_mesh()
    step_fn = step_fn or make_teacher_step(teacher, optimizer, mesh=mesh)
    seg_batch_size = seg_batch_size or batch_size
    parallel.check_divisible(f"{what}: batch_size", batch_size, mesh)
    parallel.check_divisible(f"{what}: seg_batch_size", seg_batch_size, mesh)
    if len(cls_labels) == 0 or len(seg_masks) == 0:
        raise ValueError(f"a teacher needs training images: got {len(cls_labels)} for "
                         f"classification and {len(seg_masks)} for segmentation")
    # Real rows only (no padding): a set smaller than a batch repeats within it.
    cls_stream = IndexStream(len(cls_labels), batch_size, seed, padded=False)
    seg_stream = IndexStream(len(seg_masks), seg_batch_size, seed + 1, padded=False)
    start = int(state.step)
    cls_stream.skip(start)  # replay the index streams up to the resumed step
    seg_stream.skip(start)
    key = jax.random.key(seed)
    # Every process draws the same indices and loads only its rows of them.
    cls_rows = parallel.process_rows(batch_size, mesh)
    seg_rows = parallel.process_rows(seg_batch_size, mesh)

    def step_args(i):
        ci, si = cls_stream.next()[cls_rows], seg_stream.next()[seg_rows]
        cls = parallel.shard_batch((cls_images[ci], cls_labels[ci]), mesh, batch_size)
        seg = parallel.shard_batch((seg_images[si], seg_masks[si]), mesh, seg_batch_size)
        return (jax.random.fold_in(key, i), *cls, *seg)

    try:
        state, history = train_loop(
            step_fn, parallel.replicate(state, mesh), step_args, num_steps=num_steps,
            start=start, history=history, log_every=LOG_EVERY,
            checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint, writer=writer,
            progress=progress, what=what)
    except NonFiniteError as e:
        e.state = parallel.local(e.state)
        raise
    return parallel.local(state), history


def transfer_backbone(teacher: Teacher, backbone_params: Params, key: Array,
                      image_size: int) -> dict[str, Any]:
    """Initialise ``teacher`` from a pre-trained backbone (the paper's ImageNet initialisation).

    Every parameter whose path and shape exist in ``backbone_params`` is copied;
    the rest (e.g. an ``fc8`` with a different number of outputs) keep their
    fresh seeded initialisation. Copied leaves are new buffers, so training the
    result (which donates its state) leaves ``backbone_params`` intact.
    """
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    fresh = teacher.init({"params": key}, images)["params"]
    flat_backbone = {path: leaf for path, leaf in
                     jax.tree_util.tree_flatten_with_path(backbone_params)[0]}

    def pick(path, leaf):
        source = flat_backbone.get(path)
        return jnp.array(source, copy=True) if source is not None and source.shape == leaf.shape \
            else leaf

    return jax.tree_util.tree_map_with_path(pick, fresh)


def classification_scores(teacher: Teacher, params: Params, images: Array) -> Array:
    """Teacher classification score maps ``(B, S, S, K)`` in evaluation mode."""
    return teacher.apply({"params": params}, images, method=_classification_forward)


def segmentation_scores(teacher: Teacher, params: Params, images: Array) -> Array:
    """Teacher segmentation scores ``(B, H, W, C)`` in evaluation mode."""
    return teacher.apply({"params": params}, images, method=_segmentation_forward)
