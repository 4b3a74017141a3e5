"""Make the checkout importable when the package is not installed (``pip install -e .``);
run tests marked ``torch`` only where PyTorch is installed (always in CI)."""

import importlib.util
import os
import pathlib
import sys

import pytest

_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


def pytest_collection_modifyitems(config, items):
    """Skip ``torch``-marked tests without PyTorch; with NETTRANSPLANT_REQUIRE_TORCH=1 (CI)
    they run anyway, so a missing PyTorch fails them instead of hiding them."""
    if importlib.util.find_spec("torch") is not None or \
            os.environ.get("NETTRANSPLANT_REQUIRE_TORCH") == "1":
        return
    skip = pytest.mark.skip(reason="needs PyTorch: pip install -e '.[torch]' (or torch==2.13.0)")
    for item in items:
        if item.get_closest_marker("torch") is not None:
            item.add_marker(skip)
