"""The same train steps on meshes of 1, 2, 4, … fake CPU devices, in one process.

Run by ``tests/test_parallel.py`` in a subprocess (the fake device count must be
set before JAX starts)::

    python tests/parallel_worker.py OUT_DIR 1,2,4,8

For each device count it runs, on a mesh of that many devices: two steps of a
teacher (:func:`teachers.train_teacher`), two steps of an adapter with each
method (:func:`train_adapter`), a closed-form solve, the same
back-distillation step as ``jax.pmap`` code writes it (explicit ``pmean`` of
the gradients), and batch sizes that do not divide over the devices. It writes
``OUT_DIR/arrays.npz`` (``case/devices/leaf``) and ``OUT_DIR/report.json``;
the test compares them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

COUNTS = [int(n) for n in sys.argv[2].split(",")]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={max(COUNTS)}")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import nettransplant.transplant.step  # noqa: E402
from nettransplant.benchmarks import step_benchmark  # noqa: E402
from nettransplant.configs import silhouettes  # noqa: E402
from nettransplant.core import modules  # noqa: E402
from nettransplant.runtime import parallel  # noqa: E402
from nettransplant.training import teachers  # noqa: E402
from nettransplant.training.loop import create_train_state, guarded_update  # noqa: E402
from nettransplant.transplant import closed_form, objectives  # noqa: E402
from nettransplant.transplant.step import make_train_step, train_adapter  # noqa: E402
from nettransplant.transplant.wiring import split_params  # noqa: E402

BATCH = 8  # rows per step: divides by every device count tested
REAL_ROWS = 6  # labelled rows; the last 2 of the batch are padding (masked out)


def flat(tree) -> dict[str, np.ndarray]:
    def name(k):  # dict key, dataclass field or list index
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

    return {"/".join(name(k) for k in path):
            np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def metrics(history: list[dict[str, float]]) -> dict[str, list[float]]:
    """Each logged metric (loss, its terms, gradient and parameter norms) over the steps."""
    return {k: [h[k] for h in history] for k in history[0] if k != "step"}


def teacher_setup():
    teacher = modules.make_teacher(width=1 / 16, input_size=32)
    rng = np.random.default_rng(0)
    arrays = dict(cls_images=rng.normal(size=(24, 32, 32, 3)).astype(np.float32),
                  cls_labels=rng.integers(0, 2, 24).astype(np.int32),
                  seg_images=rng.normal(size=(24, 32, 32, 3)).astype(np.float32),
                  seg_masks=rng.integers(0, 2, (24, 32, 32)).astype(np.int32))
    return teacher, arrays


def adapter_setup():
    config = silhouettes.get_config("quick")
    transplant, params = step_benchmark.build_transplant(config, (1, 3))
    adapter_params, frozen = split_params(params)
    key = jax.random.key(1)
    shape = objectives.output_gradient_shape(transplant, image_size=32, score_size=7)
    cache = objectives.build_chain_cache(transplant, frozen, key, 16, shape)
    scalars = objectives.compute_scalars(cache, 1.0, 10.0)
    images = jax.random.uniform(key, (REAL_ROWS, 32, 32, 3))
    data = objectives.make_transfer_data(
        transplant, frozen, transplant.features(params, images),
        jnp.arange(REAL_ROWS) % 2, key=key, pad_to=BATCH)
    return transplant, adapter_params, frozen, cache, scalars, data


def main() -> None:
    out = Path(sys.argv[1])
    devices = jax.devices()
    arrays: dict[str, np.ndarray] = {}
    report: dict = {"devices": len(devices), "errors": {}, "pmap_max_abs_diff": {}}
    teacher, teacher_arrays = teacher_setup()
    transplant, adapter_params, frozen, cache, scalars, data = adapter_setup()
    # SGD: a parameter moves by lr·gradient, so parameters compare like gradients (Adam's
    # first step, lr·g/|g|, would blow float noise in near-zero gradients up to ±lr).
    optimizer = optax.sgd(0.1)

    def record(case: str, n: int, tree) -> None:
        arrays.update({f"{case}/{n}/{k}": v for k, v in flat(tree).items()})

    for n in COUNTS:
        mesh = parallel.data_mesh(devices[:n])
        # A teacher: two steps of the real loop (each process-local batch sharded).
        state = teachers.create_teacher_state(teacher, jax.random.key(0), 32, optimizer)
        state, history = teachers.train_teacher(
            teacher, state, optimizer=optimizer, num_steps=2, batch_size=BATCH,
            seg_batch_size=BATCH, seed=0, progress=False, mesh=mesh, **teacher_arrays)
        record("teacher", n, {"params": state.params, "metrics": metrics(history)})

        # An adapter, each method: two steps (zero-sample back-distillation too).
        steps = {}
        for method in (*objectives.METHODS, "back-distill-zero"):
            name = method.removesuffix("-zero")
            labelled = method != "back-distill-zero"
            step = steps[method] = make_train_step(transplant, name, optimizer, mesh=mesh)
            state = create_train_state(adapter_params, optimizer)
            state, history = train_adapter(
                step, state, frozen, scalars, num_steps=2,
                data=data if labelled else None, num_samples=REAL_ROWS, batch_size=BATCH,
                draws=cache if name == "back-distill" else None, draws_per_step=BATCH,
                seed=0, progress=False, mesh=mesh)
            record(f"adapter_{method}", n, {"params": state.params, "metrics": metrics(history)})

        # The closed form: 12 draws (padded with zero draws to a multiple of n).
        solution = closed_form.solve_single_conv_adapter(transplant, cache, scalars,
                                                         num_draws=12, mesh=mesh)
        record("closed_form", n, solution)

        # The same back-distillation step written as pmap code: explicit pmean of grads.
        report["pmap_max_abs_diff"][n] = pmap_difference(
            steps["back-distill"], transplant, adapter_params, frozen, scalars, data, cache,
            optimizer, mesh)
        if n == 1:
            report["bit_identical_one_device"] = one_device_matches_plain_jit(
                steps["back-distill"], transplant, adapter_params, frozen, scalars, data,
                cache, optimizer, mesh)

        # Batches that do not divide over the devices are refused, naming both numbers.
        if n > 1:
            report["errors"][n] = refused_batches(
                n, mesh, teacher, teacher_arrays, transplant, adapter_params, frozen, scalars,
                data, cache, optimizer)

    report["max_traces_ok"] = no_retrace(transplant, adapter_params, frozen, scalars, cache,
                                         optimizer, parallel.data_mesh(devices[:2]))
    np.savez(out / "arrays.npz", **arrays)
    (out / "report.json").write_text(json.dumps(report, indent=2))


def pmap_difference(step, transplant, adapter_params, frozen, scalars, data, cache, optimizer,
                    mesh) -> float:
    """Max |Δθ_h| between the mesh step and a pmap step (pmean of grads) after one step.

    The batch has real rows only: pmap's per-device means, averaged, equal the
    batch mean only when every device holds as many weighted rows.
    """
    n = parallel.data_size(mesh)
    batch = data.take(jnp.arange(BATCH) % REAL_ROWS)  # every row real (labelled, valid)
    draw_index = jnp.arange(BATCH)

    def pmap_step(state, frozen, scalars, batch, draws):
        def loss_fn(params):
            return sum(objectives.objective_terms("back-distill", transplant, params, frozen,
                                                  scalars, batch, draws).values())

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        grads = jax.lax.pmean(grads, "data")  # what the mesh step's all-reduce does
        loss = jax.lax.pmean(loss, "data")
        return guarded_update(state, grads, loss, optimizer)[0]

    def split(tree):  # pmap's leading device axis
        return jax.tree.map(lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:]), tree)

    pmapped = jax.pmap(pmap_step, axis_name="data", in_axes=(None, None, None, 0, 0),
                       devices=list(mesh.devices.flat))
    pmap_state = pmapped(create_train_state(adapter_params, optimizer), frozen, scalars,
                         split(batch), split(cache.take(draw_index)))
    pmap_params = jax.tree.map(lambda a: a[0], pmap_state.params)

    state = parallel.replicate(create_train_state(adapter_params, optimizer), mesh)
    mesh_state, _ = step(state, *parallel.replicate((frozen, scalars, batch, cache), mesh),
                         jnp.arange(BATCH), draw_index)
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
               zip(jax.tree.leaves(pmap_params), jax.tree.leaves(mesh_state.params)))


def refused_batches(n, mesh, teacher, teacher_arrays, transplant, adapter_params, frozen,
                    scalars, data, cache, optimizer) -> dict[str, str]:
    """The error messages for a batch / draw count of n+2 (never a multiple of n > 2)."""
    bad = n + 2 if n > 2 else 3
    messages = {}
    attempts = {
        "teacher_batch": lambda: teachers.train_teacher(
            teacher, teachers.create_teacher_state(teacher, jax.random.key(0), 32, optimizer),
            optimizer=optimizer, num_steps=1, batch_size=bad, seg_batch_size=n, seed=0,
            progress=False, mesh=mesh, **teacher_arrays),
        "adapter_batch": lambda: train_adapter(
            make_train_step(transplant, "direct-learn", optimizer, mesh=mesh),
            create_train_state(adapter_params, optimizer), frozen, scalars, num_steps=1,
            data=data.take(jnp.arange(2 * BATCH) % REAL_ROWS), num_samples=REAL_ROWS,
            batch_size=bad, progress=False, mesh=mesh),
        "draws_per_step": lambda: train_adapter(
            make_train_step(transplant, "back-distill", optimizer, mesh=mesh),
            create_train_state(adapter_params, optimizer), frozen, scalars, num_steps=1,
            draws=cache, draws_per_step=bad, progress=False, mesh=mesh),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = "no error"
        except ValueError as e:
            messages[name] = f"{bad} {n} | {e}"
    return messages


def no_retrace(transplant, adapter_params, frozen, scalars, cache, optimizer, mesh) -> bool:
    """Six steps of the sharded loop trace the step once (chex.assert_max_traces)."""
    original = nettransplant.transplant.step.objective_terms
    nettransplant.transplant.step.objective_terms = chex.assert_max_traces(original, n=1)
    try:
        step = make_train_step(transplant, "back-distill", optimizer, mesh=mesh)
        train_adapter(step, create_train_state(adapter_params, optimizer), frozen,
                      scalars, num_steps=6, draws=cache, draws_per_step=BATCH,
                      progress=False, mesh=mesh)
        return True
    except AssertionError as e:
        print(f"retraced: {e}", file=sys.stderr)
        return False
    finally:
        nettransplant.transplant.step.objective_terms = original


def one_device_matches_plain_jit(step, transplant, adapter_params, frozen, scalars, data, cache,
                                 optimizer, mesh) -> bool:
    """One device: the mesh step computes exactly what an unsharded jit of the same maths does."""
    def plain(state, frozen, scalars, batch, draws):
        def loss_fn(params):
            return sum(objectives.objective_terms("back-distill", transplant, params, frozen,
                                                  scalars, batch, draws).values())
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return guarded_update(state, grads, loss, optimizer)[0]

    batch_index, draw_index = jnp.arange(BATCH), jnp.arange(BATCH)
    expected = jax.jit(plain)(create_train_state(adapter_params, optimizer), frozen,
                              scalars, data.take(batch_index), cache.take(draw_index))
    state = parallel.replicate(create_train_state(adapter_params, optimizer), mesh)
    got, _ = step(state, *parallel.replicate((frozen, scalars, data, cache), mesh),
                  batch_index, draw_index)
    return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(expected.params), jax.tree.leaves(got.params)))


if __name__ == "__main__":
    main()
