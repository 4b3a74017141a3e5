"""``python -m launch.net``: in a checkout, the same as ``nettransplant net``.

What the command does, its flags and their defaults: ``nettransplant net --help``
(:mod:`nettransplant.net.commands`).
"""

import sys

from nettransplant.net.commands import main

if __name__ == "__main__":
    sys.exit(main())
