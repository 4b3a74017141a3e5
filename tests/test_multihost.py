"""Two processes on localhost run the main job as one: JAX's distributed runtime on CPU.

Each process has 2 fake CPU devices (a mesh of 4 over both processes), loads
only its rows of each batch, and the pair writes one ``results.json`` and
collective orbax checkpoints. Compared with one process on one device: the
same metrics within :data:`POINTS`, every cell's first loss within
:data:`LOSS_RTOL`, and a teacher checkpoint written by the pair restores in a
single process. Every process is killed after
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

from nettransplant.core import modules
from nettransplant.data import benchmarks
from nettransplant.experiments import zoo
from nettransplant.training import checkpoint

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1200
POINTS = 1.0  # % (error or pixel accuracy; 4 of 400 test images): another summation order
LOSS_RTOL = 1e-3  # a cell's first loss: the same start and data; teachers and warm starts
# trained or solved in another summation order differ in their last digits
# The quick config, trimmed: Exps. 1 and 3 on one category, every method at 0 and 10
# samples (Exp. 3 also exports the transplant net, collectively). Teachers start from the
# shipped backbone (the default's pre-training settings, so it is loaded, not trained)
# and fine-tune 40 steps at the default's small learning rate, with a resumable
# checkpoint after 20: far from chance (where float noise flips test images at the
# decision boundary) and too gentle for another summation order to grow into a
# different teacher. No restarts: a run restarts when its train error passes a threshold,
# and one training image on the decision boundary could restart a run in one process
# and not in the other (restarts themselves run the same code on every device count).
# Two transplant seeds: each table average has a 95 % interval to be compared against.
OVERRIDES = ["--config.seeds=(0,1)", "--config.experiments=('exp1','exp3')",
             "--config.categories=('cat',)",
             "--config.pretrain.num_steps=8000", "--config.pretrain.renderings=4",
             "--config.teacher.num_steps=40", "--config.teacher.checkpoint_every=20",
             "--config.transplant.num_steps=6", "--config.transplant.restarts=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir: Path, devices: int, distributed: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "-m", "launch.reproduce", f"--workdir={workdir}",
               "--config=nettransplant/configs/silhouettes.py:quick", *OVERRIDES, *distributed]
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


def _warm_started(path: str) -> bool:
    """Exp. 1's back-distill rows that Adam trains from the closed-form optimum.

    There the back-distillation gradient is rounding noise, and Adam, which
    divides each coordinate's step by its own gradient scale, turns noise of either
    sign into a full step of either sign: the two runs part after the first step
    (their first losses still agree, see below) and a classifier near its decision
    boundary shows it as points of error. Segmentation (Exp. 3) averages it away.
    """
    return path.startswith("/exp1/") and "/back-distill/" in path and not path.startswith(
        "/exp1/1conv/back-distill/0/")  # the 1-conv closed form itself is not trained


def _at_chance(path: str, *values: float) -> bool:
    """Exp. 1 classification rows that 6 steps leave near chance (error ≥ 35 % in either run).

    Such a classifier sits on its decision boundary for most test images, and the
    rounding of another summation order decides on which side they fall: measured, Exp. 1
    3-conv direct-learn at 10 samples 51.25 vs 46.75 % and jacobian 43.25 vs 39.0 % on
    1 vs 4 devices, where every first loss agrees. (The main job's conclusions must not
    hang on such cells: that is a finding about the protocol, not about the mesh.)
    """
    return path.startswith("/exp1/") and max(values) >= 35.0


def test_two_processes_give_the_single_process_metrics(runs):
    single, pair = runs
    one, two = (json.loads((w / "results.json").read_text()) for w in (single, pair))
    assert two["config"]["mesh"] == {"data": -1}
    parts = ("teachers", "exp1", "exp3")
    numbers = dict(_numbers({k: one[k] for k in parts}))
    paired = dict(_numbers({k: two[k] for k in parts}))
    assert numbers.keys() == paired.keys() and len(numbers) >= 8
    compared = [k for k in numbers
                if not _warm_started(k) and not _at_chance(k, numbers[k], paired[k])]
    assert len(compared) >= 20
    worst = max(abs(numbers[k] - paired[k]) for k in compared)
    assert worst <= POINTS, {k: (numbers[k], paired[k]) for k in compared}


def test_every_table_average_is_within_its_interval_of_the_other_runs(runs):
    """The protocol's conclusions do not hang on summation order: on 1 device and on 4
    (two processes), every table average lies within the other run's 95 % interval
    (the larger of the two half-widths) of it; where both seeds gave the same number
    (a zero-width interval), within :data:`POINTS`."""
    single, pair = runs
    one, two = (json.loads((w / "results.json").read_text()) for w in (single, pair))
    averages = {k: v for k, v in _numbers({k: one[k] for k in ("exp1", "exp3")})
                if k.endswith("/avg")}
    other = dict(_numbers({k: two[k] for k in ("exp1", "exp3")}))
    halves = [dict(_numbers(r["intervals"])) for r in (one, two)]
    assert len(averages) >= 10
    for path, value in averages.items():
        width = max(h.get(path, 0.0) for h in halves) or POINTS
        assert abs(value - other[path]) <= width, (path, value, other[path], width)


def test_every_cell_starts_at_the_single_process_loss(runs):
    """Every trained cell's first loss (the same parameters and labelled samples, the
    batch split over 4 devices in 2 processes) is the single process's."""
    single, pair = runs

    def first_losses(workdir: Path) -> dict:
        out = {}
        for path in (workdir / "cells").rglob("*.json"):
            record = json.loads(path.read_text())
            if record["losses"]:
                name = path.name.rsplit("_", 1)[0]  # without the fingerprint
                out[path.parent.relative_to(workdir).as_posix() + "/" + name
                    + f"/seed{record['seed']}"] = record["losses"][0]
        return out

    one, two = first_losses(single), first_losses(pair)
    assert one.keys() == two.keys() and len(one) >= 10
    for key, value in one.items():
        # abs: a warm start's loss is the exact optimum's, zero up to rounding (~1e-11).
        assert two[key] == pytest.approx(value, rel=LOSS_RTOL, abs=1e-8), key


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
