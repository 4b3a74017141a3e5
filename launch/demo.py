"""``python -m launch.demo``: in a checkout, the same as ``nettransplant demo``.

What the command does, its flags and their defaults: ``nettransplant demo --help``
(:mod:`nettransplant.commands.demo`).
"""

import sys

from nettransplant.commands.demo import main

if __name__ == "__main__":
    sys.exit(main())
