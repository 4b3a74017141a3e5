"""``python -m launch.growth``: in a checkout, the same as ``nettransplant growth``.

What the command does, its flags and their defaults: ``nettransplant growth --help``
(:mod:`nettransplant.commands.growth`).
"""

import sys

from nettransplant.commands.growth import main

if __name__ == "__main__":
    sys.exit(main())
