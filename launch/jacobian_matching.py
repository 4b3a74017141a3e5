"""``python -m launch.jacobian_matching``: in a checkout, the same as ``nettransplant jacobian``.

What the command does, its flags and their defaults: ``nettransplant jacobian --help``
(:mod:`nettransplant.commands.jacobian_matching`).
"""

import sys

from nettransplant.commands.jacobian_matching import main

if __name__ == "__main__":
    sys.exit(main())
