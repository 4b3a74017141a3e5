"""Faults the main job survives: kill -9 and Ctrl-C anywhere, a second run, damaged checkpoints.

The kill tests run ``python -m launch.reproduce`` as a subprocess on a trimmed
quick config, kill it when a file shows it has reached a given point (during
a teacher, between teachers, during the transplants), start it again, and
check that the final ``results.json`` equals an uninterrupted run's.
The damaged-state tests break a trained teacher's files and check that the
zoo names the damage, keeps the damaged files aside and trains again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from job_configs import TRIMMED, trimmed_quick_config

from nettransplant import experiments
from nettransplant.configs import silhouettes
from nettransplant.data import benchmarks
from nettransplant.training import checkpoint, teachers

REPO = Path(__file__).resolve().parents[1]

# The trimmed quick config: what the subprocesses run (flags) and in-process tests run.
TINY = ["--config", f"{REPO}/nettransplant/configs/silhouettes.py:quick",
        *(f"--config.{k}={v!r}" for k, v in TRIMMED.items())]
TIMING = ("runtime_s", "stage_seconds")


# `python -m launch.reproduce` with Ctrl-C's default handler: a test session started in
# the background by a script hands its children an ignored SIGINT, and Python then
# installs no KeyboardInterrupt handler, so the Ctrl-C step would test nothing.
REPRODUCE = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "runpy.run_module('launch.reproduce', run_name='__main__', alter_sys=True)")


def start(workdir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", REPRODUCE, "--workdir", str(workdir),
                             *TINY, *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(process: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    """Poll until ``ready()``; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_when(workdir: Path, ready, what: str, sig=signal.SIGKILL) -> subprocess.CompletedProcess:
    process = start(workdir)
    wait_for(process, ready, what)
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def results_without_timing(workdir: Path) -> dict:
    results = json.loads((workdir / "results.json").read_text())
    for key in TIMING:
        results.pop(key)
    return results


def committed_steps(partial: Path) -> list[str]:
    """The steps orbax has committed in a resumable state (not its temporary folders)."""
    return [p.name for p in partial.iterdir() if p.name.isdigit()] if partial.is_dir() else []


def cells(workdir: Path) -> list[Path]:
    return sorted((workdir / "cells").rglob("*.json"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    process = start(workdir)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return workdir


def test_kills_anywhere_resume_to_the_uninterrupted_results(uninterrupted, tmp_path):
    workdir = tmp_path / "w"
    teachers_dir = workdir / "teachers"
    # 1. kill -9 during the first teacher, once its resumable state is on disk.
    killed = kill_when(workdir, lambda: committed_steps(teachers_dir / "cat.partial"),
                       "a committed step in cat.partial")
    assert killed.returncode == -signal.SIGKILL
    assert not checkpoint.is_checkpoint(teachers_dir / "cat")
    # 2. kill -9 between teachers: the first is finished, the second not.
    killed = kill_when(workdir, lambda: checkpoint.is_checkpoint(teachers_dir / "cat"),
                       "the cat teacher's checkpoint")
    assert killed.returncode == -signal.SIGKILL
    assert "resuming at step" in killed.stderr
    # 3. kill -9 during the transplants, after the first finished cell.
    killed = kill_when(workdir, lambda: len(cells(workdir)) >= 1, "a finished cell")
    assert killed.returncode == -signal.SIGKILL
    assert not (workdir / "results.json").exists()
    done = cells(workdir)
    # 4. Ctrl-C during the transplants: one line on how to resume, exit code 130.
    assert len(done) + 1 < len(cells(uninterrupted)), "step 3 killed the run too late"
    interrupted = kill_when(workdir, lambda: len(cells(workdir)) >= len(done) + 1,
                            "one more cell", sig=signal.SIGINT)
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    last = interrupted.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted;") and "run the same command again" in last
    assert "Traceback" not in interrupted.stderr
    before = {p: p.stat().st_mtime_ns for p in cells(workdir)}
    # 5. The last run finishes; meanwhile a second run on the workdir is refused.
    process = start(workdir)
    lock = workdir / ".lock"
    wait_for(process, lambda: lock.is_file() and lock.read_text().strip() == str(process.pid),
             "the lock")
    second = start(workdir)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert err.strip() == (f"error: {lock} is held by process {process.pid}: another run is "
                           "using this workdir; wait for it to finish or choose another "
                           "--workdir")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in before.items()), "a finished cell ran again"
    assert results_without_timing(workdir) == results_without_timing(uninterrupted)
    # (Runs 2-5 each started after a killed run: a dead process's lock never blocks.)


def test_a_diverging_transplant_is_a_named_failed_cell_and_the_job_goes_on(uninterrupted,
                                                                          tmp_path, capsys):
    workdir = tmp_path / "w"
    shutil.copytree(uninterrupted / "teachers", workdir / "teachers")  # reused, not trained
    config = trimmed_quick_config()
    # Exp. 3 is segmentation, which trains at its own rate: both rates diverge.
    config.transplant.learning_rate = config.transplant.learning_rate_segmentation = 1e30
    results = experiments.run(config, workdir, progress=False)
    failed = results["failed_cells"]
    assert "back-distill" in {f["method"] for f in failed}
    err = capsys.readouterr().err
    md = (workdir / "results.md").read_text()
    assert "## Failed cells" in md
    for f in failed:
        n = f["samples"]
        assert (f["experiment"], f["category"]) == ("exp3", "cat") and n in (10, 20, 50)
        assert f["message"].startswith(f"exp3 cat {f['method']} n={n}: non-finite")
        assert f"failed cell exp3 cat {f['method']} n={n}: diverged at step {f['step']}" in err
        assert f"| exp3 | cat | {f['method']} | {n} | {f['step']} |" in md
        # Scored with the last finite parameters: a number, not NaN.
        assert np.isfinite(results["exp3"][f["method"]][str(n)]["cat"])
    # Failed cells are kept like finished ones: a re-run reads them back.
    again = experiments.run(config, workdir, progress=False)
    assert again["failed_cells"] == failed and again["exp3"] == results["exp3"]


def test_an_unwritable_workdir_is_refused_before_any_work(tmp_path, monkeypatch):
    # Simulated (the tests may run as root, who can write anywhere): W refuses new files.
    import tempfile
    workdir = tmp_path / "w"
    original = tempfile.NamedTemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == workdir:
            raise OSError(30, "Read-only file system")
        return original(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(PermissionError, match=f"cannot write in {workdir}: Read-only file "
                                              "system; the run needs a writable workdir"):
        experiments.run(trimmed_quick_config(), workdir, progress=False)
    assert list(workdir.iterdir()) == []  # no teacher, no lock: nothing started


# ---------------------------------------------------------------- damaged teacher checkpoints


def tiny_config():
    config = silhouettes.get_config("quick")
    config.pretrain.num_steps = 0
    config.experiments = ()
    config.categories, config.target_categories = ("cat",), ()
    config.teacher.num_steps, config.teacher.checkpoint_every = 4, 2
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir holding the cat teacher, its parameters, and the benchmark."""
    config = tiny_config()
    bench = benchmarks.make_benchmark(config)
    workdir = tmp_path_factory.mktemp("trained")
    params = experiments.TeacherZoo(config, workdir, bench, progress=False).category("cat")
    return workdir, jax.device_get(params), bench


def copy_of(trained, tmp_path) -> Path:
    workdir = tmp_path / "w"
    shutil.copytree(trained[0], workdir)
    return workdir


def largest_param_file(directory: Path) -> Path:
    return max((p for p in (directory / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def assert_same(a, b) -> None:
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def retrain(trained, workdir: Path, capsys, config=None):
    zoo = experiments.TeacherZoo(config or tiny_config(), workdir, trained[2], progress=False)
    params = zoo.category("cat")
    return params, zoo, capsys.readouterr().err


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [flip_bytes, truncate], ids=["flipped", "truncated"])
def test_a_damaged_param_file_is_named_then_moved_aside_and_retrained(trained, tmp_path, capsys,
                                                                       damage):
    workdir = copy_of(trained, tmp_path)
    damage(largest_param_file(workdir / "teachers" / "cat"))
    with pytest.raises(checkpoint.CheckpointError, match=r"corrupt checkpoint .*teachers/cat.*"
                                                          r"move it away"):
        checkpoint.load_checkpoint(workdir / "teachers" / "cat", target=trained[1])
    params, zoo, err = retrain(trained, workdir, capsys)
    notice = [line for line in err.splitlines() if line.startswith("teacher cat:")]
    assert len(notice) == 1 and "moved to cat.damaged-" in notice[0], err
    assert zoo.trained == ["cat"]
    assert_same(params, trained[1])
    assert len(list((workdir / "teachers").glob("cat.damaged-*"))) == 1


def test_a_deleted_checkpoint_json_recovers_and_later_runs_reuse(trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    (workdir / "teachers" / "cat" / checkpoint.METADATA_FILE).unlink()
    params, zoo, err = retrain(trained, workdir, capsys)
    assert zoo.trained == ["cat"] and "checkpoint.json is missing" in err
    assert_same(params, trained[1])
    _, again, _ = retrain(trained, workdir, capsys)  # no FileExistsError, nothing retrained
    assert again.trained == []


def test_a_damaged_partial_is_moved_aside_and_training_restarts(trained, tmp_path, capsys,
                                                                monkeypatch):
    workdir = tmp_path / "w"
    original = teachers.train_teacher

    def interrupted(*args, on_checkpoint, **kwargs):
        def save_then_crash(state, history):
            on_checkpoint(state, history)
            raise KeyboardInterrupt

        return original(*args, on_checkpoint=save_then_crash, **kwargs)

    monkeypatch.setattr(teachers, "train_teacher", interrupted)
    with pytest.raises(KeyboardInterrupt):
        retrain(trained, workdir, capsys)
    monkeypatch.setattr(teachers, "train_teacher", original)
    partial = workdir / "teachers" / "cat.partial"
    for path in partial.rglob("*"):
        if path.is_file() and path.stat().st_size > 1000:
            flip_bytes(path)
    params, zoo, err = retrain(trained, workdir, capsys)
    assert "moved to cat.partial.damaged-" in err and "starting again" in err
    assert_same(params, trained[1])
    assert len(list((workdir / "teachers").glob("cat.partial.damaged-*"))) == 1


def test_a_changed_config_keeps_the_old_checkpoint_and_brings_it_back(trained, tmp_path, capsys,
                                                                      monkeypatch):
    workdir = copy_of(trained, tmp_path)
    old = checkpoint.load_metadata(workdir / "teachers" / "cat")["fingerprint"]
    changed = tiny_config()
    changed.teacher.learning_rate = 1e-4
    _, zoo, err = retrain(trained, workdir, capsys, config=changed)
    assert zoo.trained == ["cat"] and f"kept as cat@{old}" in err
    kept, _ = checkpoint.load_checkpoint(workdir / "teachers" / f"cat@{old}", target=trained[1])
    assert_same(kept, trained[1])

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint of this configuration was trained again")

    monkeypatch.setattr(teachers, "train_teacher", forbidden)
    params, zoo, err = retrain(trained, workdir, capsys)
    assert zoo.trained == [] and f"reusing cat@{old}" in err
    assert_same(params, trained[1])


def test_staging_folders_of_a_killed_save_are_cleaned(trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    stale = workdir / "teachers" / ".cat.tmp-0123abcd"
    (stale / "params").mkdir(parents=True)
    _, zoo, err = retrain(trained, workdir, capsys)
    assert not stale.exists() and "removed .cat.tmp-0123abcd" in err
    assert zoo.trained == []


def test_a_full_disk_leaves_the_previous_results_whole(tmp_path, monkeypatch):
    from nettransplant.experiments import workdir as workdir_lib
    results = tmp_path / "results.json"
    workdir_lib.write_atomically(results, '{"exp1": 1}')
    real_write = Path.write_bytes

    def disk_full(self, data):
        real_write(self, data[: len(data) // 2])  # half written, then no space left
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        workdir_lib.write_atomically(results, json.dumps({"exp1": 2, "exp2": 3}))
    assert json.loads(results.read_text()) == {"exp1": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left
