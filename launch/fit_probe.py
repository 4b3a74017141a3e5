"""``python -m launch.fit_probe``: in a checkout, the same as ``nettransplant fit-probe``.

What the command does, its flags and their defaults: ``nettransplant fit-probe --help``
(:mod:`nettransplant.commands.fit_probe`).
"""

import sys

from nettransplant.commands.fit_probe import main

if __name__ == "__main__":
    sys.exit(main())
