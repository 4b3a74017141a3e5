"""The command lines' bodies: flags (or arguments) and ``main`` of each ``python -m launch.X``.

``launch/X.py`` imports :func:`run` of ``nettransplant.commands.X`` and calls it; the
``launch.net`` and ``launch.convert_torchvision`` commands live beside their library
(:mod:`nettransplant.net.commands`, :mod:`nettransplant.interop.command`).
"""
