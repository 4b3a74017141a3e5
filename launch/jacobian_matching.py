"""Knowledge transfer with Jacobian matching on the embedded silhouettes.

    python -m launch.jacobian_matching --workdir workdir/jacobian_matching
    python -m launch.jacobian_matching --workdir W \\
        --config nettransplant/configs/jacobian_matching.py:quick
    python -m launch.jacobian_matching --workdir W --config.distillation.jacobian_weight=3

The full run takes 3.5-5 minutes on a 2-core CPU and writes
``W/results.json``, ``W/results.md`` (our tables beside the paper's, each claim
marked holds / does not hold) and ``W/accuracy_vs_samples.png``,
``W/accuracy_vs_noise.png``. Everything happens in
:func:`nettransplant.jacobian.experiments.run`. A bad flag or config field (checked
before any data is loaded), an unwritable ``--workdir`` or a training that
diverges prints one ``error:`` line and exits with 2; Ctrl-C exits with 130.
"""

from absl import flags

from nettransplant.commands import jacobian_matching

flags.adopt_module_key_flags(jacobian_matching)  # --help lists its flags

if __name__ == "__main__":
    jacobian_matching.run()
