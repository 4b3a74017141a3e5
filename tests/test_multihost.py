"""Two processes on localhost run the main job as one: JAX's distributed runtime on CPU.

Each process has 2 fake CPU devices (a mesh of 4 over both processes), loads
only its rows of each batch, and the pair writes one ``results.json`` and
collective orbax checkpoints. Compared with one process on one device: the
same metrics within :data:`POINTS`, and a teacher checkpoint written by the
pair restores in a single process. Every process is killed after
:data:`TIMEOUT_S` so a hang fails the test instead of stalling the suite.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import pytest

from nettransplant import checkpoint, modules
from nettransplant.data import benchmarks
from nettransplant.experiments import zoo

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
POINTS = 0.5  # % (error or pixel accuracy): float noise from another summation order
# The quick config, trimmed: Exps. 1 and 3 on one category, every method at 0 and 10
# samples (Exp. 3 also exports the transplant net, collectively); teachers from
# scratch at a learning rate that moves them off chance in 40 steps (at chance every
# score sits at the decision boundary, where float noise flips test images), with a
# resumable checkpoint after 20.
OVERRIDES = ["--config.experiments=('exp1','exp3')", "--config.categories=('cat',)",
             "--config.pretrain.num_steps=0", "--config.teacher.num_steps=40",
             "--config.teacher.learning_rate=1e-3", "--config.teacher.checkpoint_every=20",
             "--config.transplant.num_steps=6"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir: Path, devices: int, distributed: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "-m", "launch.reproduce", f"--workdir={workdir}",
               "--config=configs/silhouettes.py:quick", *OVERRIDES, *distributed]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def _wait_all(processes: dict[str, subprocess.Popen], logs: dict[str, Path]) -> None:
    """Wait for every process; on a timeout or a failure kill the rest and show the logs."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for name, proc in processes.items():
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} still running after {TIMEOUT_S} s (hung?): "
                            f"{logs[name].read_text()[-2000:]}")
            assert code == 0, f"{name} exited {code}: {logs[name].read_text()[-3000:]}"
    finally:
        for proc in processes.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _numbers(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield path, float(tree)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    logs = {name: root / f"{name}.log" for name in ("single", "process0", "process1")}
    start = time.perf_counter()
    processes = {
        f"process{i}": _start(root / "pair", 2, [f"--coordinator_address=localhost:{port}",
                                                 "--num_processes=2", f"--process_id={i}"],
                              logs[f"process{i}"])
        for i in range(2)}
    processes["single"] = _start(root / "single", 1, [], logs["single"])
    _wait_all(processes, logs)
    print(f"two-process run and single run (concurrently): {time.perf_counter() - start:.0f} s")
    return root / "single", root / "pair"


def test_two_processes_give_the_single_process_metrics(runs):
    single, pair = runs
    one, two = (json.loads((w / "results.json").read_text()) for w in (single, pair))
    assert two["config"]["mesh"] == {"data": -1}
    parts = ("teachers", "exp1", "exp3")
    numbers = dict(_numbers({k: one[k] for k in parts}))
    paired = dict(_numbers({k: two[k] for k in parts}))
    assert numbers.keys() == paired.keys() and len(numbers) >= 8
    worst = max(abs(numbers[k] - paired[k]) for k in numbers)
    assert worst <= POINTS, {k: (numbers[k], paired[k]) for k in numbers}


def test_only_process_0_writes_result_files(runs):
    _, pair = runs
    assert (pair / "results.json").is_file() and (pair / "net").is_dir()
    assert not list(pair.glob("*.tmp")) and not list(pair.glob("**/.*.tmp-*"))


def test_a_teacher_checkpoint_written_by_two_processes_restores_in_one(runs):
    """Restored here (one process, one device), the pair's teacher scores what the pair
    measured when it trained it: the parameters are the ones the pair held."""
    single, pair = runs
    params, meta = checkpoint.load_checkpoint(pair / "teachers" / "cat")  # content hash checked
    assert not (pair / "teachers" / "cat.partial").exists()  # resumable state deleted at the end
    reference, _ = checkpoint.load_checkpoint(single / "teachers" / "cat")
    assert checkpoint.flat_shapes(params) == checkpoint.flat_shapes(reference)
    config = ml_collections.ConfigDict(meta["config"])
    m = config.model
    teacher = modules.make_teacher(width=m.width, input_size=m.image_size,
                                   dropout_rate=m.dropout_rate, num_classes=m.num_classes)
    bench = benchmarks.make_benchmark(config)
    measured = {"cls_error": zoo.classification_error(teacher, params,
                                                      bench.classification("cat", "test")),
                "seg_pixel_acc": zoo.pixel_accuracy(teacher, params,
                                                    bench.segmentation("cat", "test"))}
    for name, value in meta["metrics"].items():
        assert measured[name] == pytest.approx(value, abs=1e-6), name
