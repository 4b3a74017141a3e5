"""Make the checkout importable when the package is not installed (``pip install -e .``);
run tests marked ``torch`` only where PyTorch is installed (always in CI); share one XLA
compilation cache between every test and subprocess of a session."""

import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

# Many tests compile the same programs (the quick config's steps, in-process and in the
# subprocesses that run the job): JAX's persistent compilation cache, in one folder for the
# session, compiles each once. The variables are inherited by subprocesses and by pytest-xdist
# workers; a cache folder the caller set is used as it is and kept.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="nettransplant-tests-jax-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_SESSION_CACHE,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# The files that take longest, longest first: pytest-xdist (``-n auto --dist loadfile``) hands
# files to its workers in collection order, so starting these first lets the workers end
# together instead of one worker running a long file alone at the end.
LONGEST_FIRST = ("test_multihost.py", "test_parallel.py", "test_benchmarks.py", "test_faults.py",
                 "test_wheel.py", "test_reproduce.py", "test_jacobian_matching.py", "test_net.py")


def pytest_collection_modifyitems(config, items):
    """Order the files :data:`LONGEST_FIRST`; skip ``torch``-marked tests without PyTorch
    (with NETTRANSPLANT_REQUIRE_TORCH=1, as in CI, they run anyway, so a missing PyTorch
    fails them instead of hiding them)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
    if importlib.util.find_spec("torch") is not None or \
            os.environ.get("NETTRANSPLANT_REQUIRE_TORCH") == "1":
        return
    skip = pytest.mark.skip(reason="needs PyTorch: pip install -e '.[torch]' (or torch==2.13.0)")
    for item in items:
        if item.get_closest_marker("torch") is not None:
            item.add_marker(skip)
