"""Data parallelism: the same numbers on 1, 2, 4 and 8 devices, and pmap's semantics.

One subprocess (``tests/parallel_worker.py``, 8 fake CPU devices) runs a
teacher, an adapter with each method and the closed form on meshes of 1, 2, 4
and 8 devices; the tests compare every result with the one-device mesh.
Tolerance: float32 reductions summed in another order — losses, gradient norms
and parameters (two SGD steps) agree to ``RTOL`` relative (``ATOL`` absolute
for values near 0).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from nettransplant.runtime import parallel

COUNTS = (1, 2, 4, 8)
RTOL, ATOL = 1e-5, 1e-6
WORKER = Path(__file__).with_name("parallel_worker.py")
CASES = ("teacher", "adapter_back-distill", "adapter_direct-learn", "adapter_distill",
         "adapter_jacobian", "adapter_back-distill-zero", "closed_form")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(WORKER), str(out), ",".join(map(str, COUNTS))],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arrays = dict(np.load(out / "arrays.npz"))
    return arrays, json.loads((out / "report.json").read_text())


def _case(arrays, case, n):
    prefix = f"{case}/{n}/"
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


@pytest.mark.parametrize("case", CASES)
def test_a_step_on_2_4_8_devices_gives_the_one_device_numbers(runs, case):
    arrays, _ = runs
    one = _case(arrays, case, 1)
    assert one, f"no results for {case}"
    for n in COUNTS[1:]:
        many = _case(arrays, case, n)
        assert many.keys() == one.keys()
        for leaf in one:
            np.testing.assert_allclose(many[leaf], one[leaf], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{case} on {n} devices, {leaf}")


def test_the_compared_steps_move_the_parameters(runs):
    """The equivalence above is not that of steps that change nothing."""
    arrays, _ = runs
    for case in CASES[:-1]:
        one = _case(arrays, case, 1)
        assert np.isfinite(one["metrics/loss/1"]), case
        assert one["metrics/grad_norm/0"] > 1e-5 and one["metrics/grad_norm/1"] > 1e-5, case


def test_a_pmap_step_with_pmean_of_gradients_equals_the_mesh_step(runs):
    _, report = runs
    for n in COUNTS:
        assert report["pmap_max_abs_diff"][str(n)] <= ATOL, n


def test_one_device_mesh_step_is_bit_identical_to_an_unsharded_jit(runs):
    assert runs[1]["bit_identical_one_device"]


def test_the_sharded_loop_traces_its_step_once(runs):
    assert runs[1]["max_traces_ok"]


def test_a_batch_that_does_not_divide_over_the_devices_is_refused_naming_both(runs):
    _, report = runs
    for n in COUNTS[1:]:
        for what, message in report["errors"][str(n)].items():
            numbers, _, text = message.partition(" | ")
            bad, devices = numbers.split()
            assert f" {bad} does not divide over the {devices} devices" in text, (what, message)


# --------------------------------------------------------------------------- in process


def test_the_default_mesh_puts_every_device_on_the_data_axis():
    mesh = parallel.mesh_from_config(None)
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    assert parallel.mesh_from_config({"data": -1}).shape == mesh.shape


def test_mesh_config_errors_name_the_problem():
    n = jax.device_count()
    with pytest.raises(ValueError, match="no 'data' axis"):
        parallel.mesh_from_config({"model": -1})
    with pytest.raises(ValueError, match=f"needs {n + 1} devices, {n} are visible"):
        parallel.mesh_from_config({"data": n + 1})
    with pytest.raises(ValueError, match="at most one axis"):
        parallel.mesh_from_config({"data": -1, "model": -1})


def test_one_process_loads_the_whole_batch():
    mesh = parallel.data_mesh()
    assert parallel.process_rows(8, mesh) == slice(0, 8)
    batch = parallel.shard_batch(np.arange(8.0), mesh, 8)
    np.testing.assert_array_equal(np.asarray(batch), np.arange(8.0))
    assert parallel.local(parallel.replicate({"w": np.ones(3)}, mesh))["w"].shape == (3,)


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, None),  # one task: one process
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, "slurm"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, "tpu"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
])
def test_clusters_are_detected_only_with_several_processes(environ, expected):
    assert parallel.cluster_detected(environ) == expected


def test_distributed_flags_must_come_together():
    with pytest.raises(ValueError, match="need --coordinator_address"):
        parallel.initialize_distributed(None, 2, 0)
    with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
        parallel.initialize_distributed("localhost:1234", 2, None)
    with pytest.raises(ValueError, match=r"--process_id 2 is not in \[0, 2\)"):
        parallel.initialize_distributed("localhost:1234", 2, 2)
    assert parallel.initialize_distributed() is False  # no cluster here: one process


def test_a_bfloat16_teacher_step_keeps_float32_parameters_and_learns():
    import jax.numpy as jnp
    import optax

    from nettransplant.core import modules
    from nettransplant.training import teachers

    teacher = modules.make_teacher(width=1 / 16, input_size=32)
    optimizer = optax.sgd(0.1)
    state = teachers.create_teacher_state(teacher, jax.random.key(0), 32, optimizer)
    before = jax.tree.map(np.asarray, state.params)
    step = teachers.make_teacher_step(teacher, optimizer, compute_dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    state, metrics = step(state, jax.random.key(1), images, np.array([0, 1, 0, 1]), images,
                          rng.integers(0, 2, (4, 32, 32)).astype(np.int32))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    leaves = jax.tree.leaves(state.params)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), leaves))
