"""``python -m launch.reproduce``: in a checkout, the same as ``nettransplant reproduce``.

What the command does, its flags and their defaults: ``nettransplant reproduce --help``
(:mod:`nettransplant.commands.reproduce`).
"""

import sys

from nettransplant.commands.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
