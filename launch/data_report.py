"""``python -m launch.data_report``: in a checkout, the same as ``nettransplant data-report``.

What the command does, its flags and their defaults: ``nettransplant data-report --help``
(:mod:`nettransplant.commands.data_report`).
"""

import sys

from nettransplant.commands.data_report import main

if __name__ == "__main__":
    sys.exit(main())
