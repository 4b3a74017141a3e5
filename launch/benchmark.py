"""``python -m launch.benchmark``: in a checkout, the same as ``nettransplant benchmark``.

What the command does, its flags and their defaults: ``nettransplant benchmark --help``
(:mod:`nettransplant.commands.benchmark`).
"""

import sys

from nettransplant.commands.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
