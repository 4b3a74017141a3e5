"""Build, grow, inspect and use a transplant net from the command line.

    python -m launch.net build --teacher W/teachers/dog --out NET
    python -m launch.net samples --category horse --task segmentation --num 10 --out h.npz
    python -m launch.net transplant --net NET --teacher W/teachers/horse \\
        --onto dog.segmentation --samples h.npz --out NET2
    python -m launch.net connect --net NET2 --category cat --task-module dog.segmentation \\
        --samples cat.npz --out NET3
    python -m launch.net add-task --net NET --name shared.classification \\
        --task classification --data cat=cat.npz --data dog=dog.npz --out NET4
    python -m launch.net info --net NET --json
    python -m launch.net predict --net NET --category cat --task cat.segmentation \\
        --images imgs.npz --out preds.npz --overlays overlays/

Every command that grows a net writes a new net (``--out``) and leaves the
input net untouched. The commands live in :mod:`nettransplant.net.commands`.
"""

import sys

from nettransplant.net.commands import main

if __name__ == "__main__":
    sys.exit(main())
