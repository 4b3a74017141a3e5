"""The wheel works on its own: built, installed in a fresh venv, run from outside the checkout.

The wheel is built from a copy of the package's sources (so no build folder lands in the
checkout), offline where this environment has the build backend, and installed without
its dependencies into a fresh venv; the test environment's dependencies are made visible
to that venv by a ``.pth`` file added after the install (the checkout's own, editable
nettransplant is not). From a folder outside the checkout, ``nettransplant`` and every
command's ``--help`` exit 0 and a trimmed quick main job writes its results.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from job_configs import TRIMMED

from nettransplant.commands import COMMANDS

pytestmark = pytest.mark.slow  # a wheel build, a venv and a short main job (minutes)

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "nettransplant")


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                            **kwargs)
    assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
    return result


def _has_build_backend() -> bool:
    """Whether this environment has setuptools >= 77 (pyproject.toml's build requirement)."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout's package sources."""
    root = tmp_path_factory.mktemp("build")
    source = root / "source"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    # With the build backend pyproject.toml asks for at hand, offline; else pip fetches it.
    offline = ["--no-build-isolation", "--no-index"] if _has_build_backend() else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-w", root / "dist",
          source], timeout=600)
    (built,) = (root / "dist").glob("nettransplant-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed; ``env`` runs its ``nettransplant`` first."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], timeout=300)
    python = root / "venv" / "bin" / "python"
    # Installed before the dependencies are made visible: pip then sees no nettransplant.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
          "--no-index", "--no-cache-dir", wheel], timeout=600)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                     ).stdout.strip())
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "test_environment.pth").write_text("".join(f"{p}\n" for p in sorted(outer)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{root / 'venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               JAX_PLATFORMS="cpu")
    outside = root / "elsewhere"
    outside.mkdir()
    return {"python": python, "site": site, "env": env, "cwd": outside}


def test_the_wheel_ships_the_package_configs_and_backbone_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"nettransplant"}, top
    assert not {"configs", "launch", "tests"} & top
    for config in ("silhouettes", "voc_vgg16", "net_growth", "jacobian_matching"):
        assert f"nettransplant/configs/{config}.py" in names
    for shipped in ("silhouettes_backbone.npz", "silhouettes_backbone.json"):
        assert f"nettransplant/pretrained/{shipped}" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "nettransplant = nettransplant.commands:console" in scripts


def test_the_installed_package_is_the_wheels_not_the_checkouts(venv):
    found = _run([venv["python"], "-c", "import nettransplant; print(nettransplant.__file__)"],
                 cwd=venv["cwd"], env=venv["env"]).stdout.strip()
    assert Path(found).is_relative_to(venv["site"]), found
    assert not Path(found).is_relative_to(REPO)


def test_every_command_answers_help_from_outside_the_checkout(venv):
    listed = _run(["nettransplant", "--help"], cwd=venv["cwd"], env=venv["env"]).stdout
    for name in COMMANDS:
        assert f"  {name} " in listed, (name, listed)
        shown = _run(["nettransplant", name, "--help"], cwd=venv["cwd"], env=venv["env"],
                     timeout=300).stdout
        assert f"nettransplant {name}" in shown, (name, shown)
        if name != "net":
            assert "(default:" in shown or "(required)" in shown, (name, shown)
    unknown = subprocess.run(["nettransplant", "bogus"], cwd=venv["cwd"], env=venv["env"],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert unknown.stderr.startswith("error: nettransplant: unknown command 'bogus'")


def test_the_quick_main_job_runs_from_the_installed_wheel(venv):
    workdir = venv["cwd"] / "w"
    # The trimmed quick job with two sample counts: Exp. 3's cells for one category.
    trimmed = {**TRIMMED, "sample_counts": (0, 10)}
    overrides = [f"--config.{key}={value!r}" for key, value in trimmed.items()]
    result = subprocess.run(["nettransplant", "reproduce", "--config", "silhouettes:quick",
                             "--workdir", workdir, *overrides], cwd=venv["cwd"],
                            env=venv["env"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert "exp3" in results, sorted(results)
    assert not (venv["site"] / "nettransplant" / "workdir").exists()
