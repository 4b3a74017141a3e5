"""``python -m launch.pretrain``: in a checkout, the same as ``nettransplant pretrain``.

What the command does, its flags and their defaults: ``nettransplant pretrain --help``
(:mod:`nettransplant.commands.pretrain`).
"""

import sys

from nettransplant.commands.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
