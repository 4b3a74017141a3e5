"""Grow a transplant net on the embedded data: choose task modules, fine-tune, measure forgetting.

    python -m launch.growth --workdir W          # W: the main job's workdir (teachers reused)
    python -m launch.growth --workdir W --config nettransplant/configs/net_growth.py:quick

Runs :func:`nettransplant.experiments.growth.run`; writes ``W/growth/results.json``
and ``W/growth/results.md`` (what they hold: ``nettransplant/configs/net_growth.py``).
"""

from absl import flags

from nettransplant.commands import growth

flags.adopt_module_key_flags(growth)  # --help lists its flags

if __name__ == "__main__":
    growth.run()
