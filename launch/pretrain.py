"""Pre-train the embedded benchmark's shared backbone and ship it with the package.

    python -m launch.pretrain --workdir workdir/pretrain

trains the backbone of ``--config`` (default ``nettransplant/configs/silhouettes.py``: its
``seed``, ``model`` and ``pretrain`` sections; resumable in ``--workdir``) and
writes ``nettransplant/pretrained/silhouettes_backbone.{npz,json}``, which the
main job loads instead of training it when its configuration matches
(``--output_dir`` writes elsewhere). The same config and seed give the same
weights on the same CPU family. A bad flag or config field prints one
``error:`` line and exits with 2.
"""

from absl import flags

from nettransplant.commands import pretrain

flags.adopt_module_key_flags(pretrain)  # --help lists its flags

if __name__ == "__main__":
    pretrain.run()
