"""The job's persistent compilation cache: a repeated or resumed run loads what it compiled.

Each case is a fresh process (the cache decides per process), counting JAX's
``/jax/compilation_cache/cache_hits`` and ``cache_misses`` events.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from jax import monitoring
from nettransplant.experiments.workdir import use_compilation_cache

events = []
monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
folder = use_compilation_cache(sys.argv[1])
jax.jit(lambda x: jnp.tanh(x @ x.T) * 3.0 + 1.0)(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"folder": str(folder),
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _run(workdir: Path, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE",
                                                                     "JAX_PERSISTENT_CACHE"))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(workdir)], cwd=REPO,
                          env={**clean, "JAX_PLATFORMS": "cpu", **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_run_in_the_workdir_loads_every_program_instead_of_compiling(tmp_path):
    first = _run(tmp_path / "w")
    assert first["folder"] == str(tmp_path / "w" / "jax_cache")
    assert first["misses"] >= 1 and first["hits"] == 0
    assert any((tmp_path / "w" / "jax_cache").iterdir())
    second = _run(tmp_path / "w")
    assert second["hits"] >= 1 and second["misses"] == 0


def test_a_cache_the_user_set_is_used_and_the_workdir_gets_none(tmp_path):
    mine = tmp_path / "mine"
    run = _run(tmp_path / "w", JAX_COMPILATION_CACHE_DIR=str(mine))
    assert run["folder"] == str(mine)
    assert not (tmp_path / "w" / "jax_cache").exists()
