"""``python -m launch.convert_torchvision``: in a checkout, the same as ``nettransplant convert``.

What the command does, its flags and their defaults: ``nettransplant convert --help``
(:mod:`nettransplant.interop.command`).
"""

import sys

from nettransplant.interop.command import main

if __name__ == "__main__":
    sys.exit(main())
