"""The paper's experiments end to end: teachers, Exps. 1-3, Table 4, tables, plots, a net.

    python -m launch.reproduce --workdir workdir/reproduce
    python -m launch.reproduce --workdir W --config nettransplant/configs/silhouettes.py:quick
    python -m launch.reproduce --workdir W --config.generic_category=elephant
    python -m launch.reproduce --workdir W --config nettransplant/configs/voc_vgg16.py \\
        --config.voc.manual_dir=D --config.pretrain.weights=vgg16.pth   # paper scale
    python -m launch.reproduce --workdir W --coordinator_address=host0:1234 \\
        --num_processes=2 --process_id=0   # (and =1 on host1): docs/scaling.md

Everything happens in :func:`nettransplant.experiments.paper.run`; the layout of
``W`` is described in docs/main_job.md. The same command resumes an
interrupted run (finished teachers and transplant cells are kept). A bad flag or
config field prints one ``error:`` line and exits with 2; Ctrl-C exits with 130.
"""

from absl import flags

from nettransplant.commands import reproduce

flags.adopt_module_key_flags(reproduce)  # --help lists its flags

if __name__ == "__main__":
    reproduce.run()
