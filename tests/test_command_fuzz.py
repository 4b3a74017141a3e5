"""Every command against bad values, a missing config, an unwritable output and failures.

Each command runs as a subprocess (``python -m launch.<command>``) with an input
refused before any data is loaded or any model trained: NaN, negative, zero or
unknown values, a ``--config`` file that does not exist, an output folder that
cannot be written (read-only; as root, which ignores permissions, a path through
a regular file). Each must exit with 2, end stderr with one ``error:`` line,
print no traceback and leave the folders it was given as they were. The
``launch.net`` subcommands (in-process; their deep cases are in
``test_net_hardening.py``) get one bad value each. :func:`nettransplant.runtime.cli.run_main`
itself is checked in-process: a divergence, a full disk or a read-only file system
is one line (exit 2); a bug keeps its traceback and ends with how to report it.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import net as net_cli
from nettransplant.runtime import cli
from nettransplant.training.loop import NonFiniteError

pytestmark = pytest.mark.slow  # ~25 interpreter starts with JAX

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def paths(tmp_path):
    """``{w}``: a fresh workdir (not created); ``{ro}``: a folder that cannot be written;
    ``{missing}``: a config file that does not exist; ``{weights}``: an empty weights file."""
    if os.geteuid() == 0:  # root writes anywhere: a path through a regular file cannot be made
        blocker = tmp_path / "a_file"
        blocker.write_text("not a folder")
        unwritable = blocker / "out"
        locked = None
    else:
        locked = tmp_path / "read_only"
        locked.mkdir()
        locked.chmod(0o555)
        unwritable = locked / "out"
    (tmp_path / "w.safetensors").write_bytes(b"")
    yield {"w": str(tmp_path / "w"), "ro": str(unwritable),
           "missing": str(tmp_path / "absent_config.py"),
           "weights": str(tmp_path / "w.safetensors")}
    if locked is not None:
        locked.chmod(0o755)


def _files(root: Path, *, folders: bool = True) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")
            if folders or not p.is_dir()}


CASES = {
    # launch.jacobian_matching: every field checked before the data is loaded.
    "jacobian lr nan": ("jacobian_matching", ["--workdir", "{w}",
                                              "--config.distillation.learning_rate=nan"],
                        "config.distillation.learning_rate must be finite"),
    "jacobian temperature 0": ("jacobian_matching", ["--workdir", "{w}",
                                                     "--config.distillation.temperature=0"],
                               "config.distillation.temperature must be > 0, got 0"),
    "jacobian steps -5": ("jacobian_matching", ["--workdir", "{w}",
                                                "--config.distillation.num_steps=-5"],
                          "config.distillation.num_steps must be in [1,"),
    "jacobian bogus selection": ("jacobian_matching",
                                 ["--workdir", "{w}", "--config.transfer.selection=bogus"],
                                 "config.transfer.selection must be one of top, label, all"),
    "jacobian zero samples": ("jacobian_matching",
                              ["--workdir", "{w}", "--config",
                               "nettransplant/configs/jacobian_matching.py:quick",
                               "--config.distillation.samples_per_class=(0,)"],
                              "config.distillation.samples_per_class[0] must be"),
    "jacobian missing config": ("jacobian_matching", ["--workdir", "{w}", "--config",
                                                      "{missing}"], "no config file"),
    "jacobian unwritable": ("jacobian_matching", ["--workdir", "{ro}"], "{ro}"),
    # launch.growth: the growth section is checked before any teacher is trained.
    "growth lr nan": ("growth", ["--workdir", "{w}", "--config",
                                 "nettransplant/configs/net_growth.py:quick",
                                 "--config.growth.fine_tune_learning_rate=nan"],
                      "config.growth.fine_tune_learning_rate must be finite"),
    "growth samples -5": ("growth", ["--workdir", "{w}", "--config.growth.samples=-5"],
                          "config.growth.samples must be in [1,"),
    "growth unwritable": ("growth", ["--workdir", "{ro}", "--config",
                                     "nettransplant/configs/net_growth.py:quick"], "{ro}"),
    # The main job and the other absl commands.
    "reproduce missing config": ("reproduce", ["--workdir", "{w}", "--config", "{missing}"],
                                 "no config file"),
    "reproduce unwritable": ("reproduce", ["--workdir", "{ro}", "--config",
                                           "nettransplant/configs/silhouettes.py:quick"], "{ro}"),
    "pretrain lr negative": ("pretrain", ["--workdir", "{w}", "--output_dir", "{w}/out",
                                          "--config.pretrain.learning_rate=-1"],
                             "config.pretrain.learning_rate must be > 0"),
    "pretrain unwritable": ("pretrain", ["--workdir", "{w}", "--output_dir", "{ro}",
                                         "--config", "nettransplant/configs/silhouettes.py:quick"],
                            "--output_dir {ro}"),
    "fit_probe zero samples": ("fit_probe", ["--workdir", "{w}", "--config",
                                             "nettransplant/configs/silhouettes.py:quick",
                                             "--samples=0"],
                               "--samples must be >= 1"),
    "fit_probe unwritable json": ("fit_probe", ["--workdir", "{w}", "--config",
                                                "nettransplant/configs/silhouettes.py:quick",
                                                "--json", "{ro}/r.json"], "--json {ro}"),
    # argparse commands.
    "demo zero samples": ("demo", ["--workdir", "{w}", "--num_samples", "0"],
                          "--num_samples must be >= 1"),
    "demo unwritable": ("demo", ["--workdir", "{ro}", "--quick"], "--workdir {ro}"),
    "data_report unwritable": ("data_report", ["--json", "{w}/r.json", "--out", "{ro}"],
                               "--out {ro}"),
    "data_report bad size": ("data_report", ["--json", "{w}/r.json", "--out", "{w}/o",
                                             "--image_size", "-5"], "--image_size must be in"),
    "benchmark bogus adapter": ("benchmark", ["--quick", "--adapters", "bogus"],
                                "--adapters: unknown ['bogus']"),
    "benchmark unwritable json": ("benchmark", ["--quick", "--json", "{ro}/b.json"],
                                  "--json {ro}"),
    "convert missing weights": ("convert_torchvision", ["--weights", "{w}/absent.pth", "--out",
                                                        "{w}/ckpt"], "no such file"),
    "convert unwritable": ("convert_torchvision", ["--weights", "{weights}", "--out",
                                                   "{ro}/ckpt"], "--out"),
    "net missing net": ("net", ["info", "--net", "{w}/absent"], "absent"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_command_refuses_in_one_line_and_writes_nothing(case, paths, tmp_path):
    command, args, expected = CASES[case]
    args = [a.format(**paths) for a in args]
    before = _files(tmp_path)
    result = subprocess.run([sys.executable, "-m", f"launch.{command}", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=240,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and lines[-1].startswith("error:"), result.stderr
    assert expected.format(**paths) in lines[-1], (expected, lines[-1])
    assert _files(tmp_path) == before  # nothing created, nothing half-written


def test_a_run_that_diverges_ends_in_one_line_naming_what_diverged(tmp_path):
    """A rate that passes the checks (finite, > 0) but makes the teacher diverge: one line
    naming the training and the step, exit 2, nothing but the empty workdir left."""
    workdir = tmp_path / "w"
    result = subprocess.run(
        [sys.executable, "-m", "launch.jacobian_matching", "--workdir", str(workdir),
         "--config", "nettransplant/configs/jacobian_matching.py:quick",
         "--config.teacher_training.learning_rate=1e30",
         "--config.teacher_training.log_every=5"], cwd=REPO, capture_output=True, text=True,
        timeout=240, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("error: training diverged: teacher: non-finite"), lines[-1]
    assert "at step" in lines[-1]
    assert list(workdir.iterdir()) == []


# ---------------------------------------------------------------- launch.net subcommands

NET_CASES = {
    "build": ["build", "--teacher", "{w}/absent_teacher", "--out", "{w}/net"],
    "samples": ["samples", "--category", "cat", "--task", "segmentation", "--num", "0",
                "--out", "{w}/s.npz"],
    "transplant": ["transplant", "--net", "{w}/absent", "--teacher", "{w}/t", "--onto",
                   "dog.segmentation", "--beta", "nan", "--out", "{w}/n2"],
    "connect": ["connect", "--net", "{w}/absent", "--category", "cat", "--task_module",
                "dog.segmentation", "--steps", "-5", "--out", "{w}/n3"],
    "add-task": ["add-task", "--net", "{w}/absent", "--name", "x.classification", "--task",
                 "bogus", "--data", "cat={w}/c.npz", "--out", "{w}/n4"],
    "info": ["info", "--net", "{w}/absent"],
    "predict": ["predict", "--net", "{w}/absent", "--category", "cat", "--task",
                "cat.segmentation", "--images", "{w}/i.npz", "--out", "{w}/p.npz"],
}


@pytest.mark.parametrize("subcommand", sorted(NET_CASES))
def test_every_net_subcommand_refuses_a_bad_value_in_one_line(subcommand, paths, tmp_path,
                                                              capsys):
    before = _files(tmp_path, folders=False)  # (--out's parent may be made before the refusal)
    try:
        code = net_cli.main([a.format(**paths) for a in NET_CASES[subcommand]])
    except SystemExit as stop:  # argparse's refusal
        code = stop.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines and lines[-1].startswith("error:"), err
    assert "Traceback" not in err
    assert _files(tmp_path, folders=False) == before


# ---------------------------------------------------------------- run_main's failures


def _run(work, capsys) -> tuple[int, list[str]]:
    code = cli.run_main(work)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_divergence_is_one_line_naming_what_diverged(capsys):
    def work():
        raise NonFiniteError("distill outputs n=1 seed=0: non-finite loss at step 3; the "
                             "update was not applied", state=None, metrics={}, step=3)

    code, lines = _run(work, capsys)
    assert code == cli.EXIT_USAGE and len(lines) == 1
    assert lines[0].startswith("error: training diverged: distill outputs n=1 seed=0: "
                               "non-finite loss at step 3")


@pytest.mark.parametrize("number, reason", [
    (errno.ENOSPC, "the disk is full"), (errno.EROFS, "the file system is read-only"),
    (errno.EACCES, "permission denied"), (errno.EDQUOT, "the disk quota is exceeded")])
def test_a_full_disk_or_read_only_output_is_one_line_naming_the_path(number, reason, capsys):
    def work():
        raise OSError(number, os.strerror(number), "/out/results.json")

    code, lines = _run(work, capsys)
    assert code == cli.EXIT_USAGE and len(lines) == 1
    assert lines[0].startswith("error: /out/results.json: ") and reason in lines[0]


def test_a_bug_keeps_its_traceback_and_says_how_to_report_it(capsys):
    def work():
        raise RuntimeError("an invariant broke")

    code, lines = _run(work, capsys)
    assert code == cli.EXIT_BUG
    assert lines[0].startswith("Traceback") and "RuntimeError: an invariant broke" in lines
    assert lines[-1] == cli.BUG_REPORT


def test_an_unwritable_folder_is_refused_before_any_work(paths):
    with pytest.raises(cli.UsageError, match="--out .*cannot write there"):
        cli.check_output_folder(paths["ro"], "--out")
    with pytest.raises(cli.UsageError, match="--out .*cannot write there"):
        cli.check_output_folder(Path(paths["ro"]) / "deeper", "--out", create=False)


# ---------------------------------------------------------------- the config checks


@pytest.mark.parametrize("variant", [None, "quick"])
def test_the_shipped_configs_pass_their_checks(variant):
    from nettransplant.configs import jacobian_matching, net_growth
    from nettransplant.experiments import growth
    from nettransplant.jacobian import experiments

    experiments.validate_config(jacobian_matching.get_config(variant))
    growth.validate_config(net_growth.get_config(variant))


def _set(config, field: str, value) -> None:
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


@pytest.mark.parametrize("command, field, value, message", [
    ("jacobian", "student_seeds", (-1,), "config.student_seeds[0] must be in [0,"),
    ("jacobian", "image_size", 5, "config.image_size must divide 28, got 5"),
    ("jacobian", "categories", ("cat",), "config.categories must hold at least 2 items"),
    ("jacobian", "teacher.hidden", 0, "config.teacher.hidden must be in [1,"),
    ("jacobian", "teacher_training.learning_rate", float("inf"),
     "config.teacher_training.learning_rate must be finite, got inf"),
    ("jacobian", "distillation.methods", ("outputs", "bogus"),
     "config.distillation.methods: unknown ['bogus']"),
    ("jacobian", "distillation.noise_min_agreement", 1.5,
     "config.distillation.noise_min_agreement must be in [0, 1], got 1.5"),
    ("jacobian", "distillation.jacobian_weight", -1.0,
     "config.distillation.jacobian_weight must be >= 0, got -1"),
    ("jacobian", "transfer.samples_per_class", (25, "most"),
     "config.transfer.samples_per_class[1] must be an integer"),
    ("jacobian", "transfer.attention_layers", ("pool9",),
     "config.transfer.attention_layers: unknown ['pool9']; choose from ['pool1', 'pool2']"),
    ("jacobian", "transfer.temperature", 0.0, "config.transfer.temperature must be > 0, got 0"),
    ("growth", "growth.tasks", ("bogus",), "config.growth.tasks: unknown ['bogus']"),
    ("growth", "growth.fine_tune_steps", 0, "config.growth.fine_tune_steps must be in [1,"),
    ("growth", "growth.fine_tune_batch_size", -1,
     "config.growth.fine_tune_batch_size must be in [1,"),
    ("growth", "growth.fine_tune_categories", ("horse",),
     "config.growth.fine_tune_categories: ['horse'] have no route through "
     "dog.classification"),
    ("growth", "teacher.learning_rate", float("nan"),
     "config.teacher.learning_rate must be finite"),
])
def test_each_config_field_is_checked_and_named(command, field, value, message):
    from nettransplant.configs import jacobian_matching, net_growth
    from nettransplant.experiments import growth
    from nettransplant.jacobian import experiments

    module, config = ((experiments, jacobian_matching.get_config()) if command == "jacobian"
                      else (growth, net_growth.get_config("quick")))
    _set(config, field, value)
    with pytest.raises(ValueError) as refused:
        module.validate_config(config)
    assert str(refused.value).startswith(message), str(refused.value)
    assert "\n" not in str(refused.value)
