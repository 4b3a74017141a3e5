"""Report on the embedded benchmark: counts, balance, example grids, pixel baselines.

    python -m launch.data_report --json data_report.json --out data_report/

Builds the dataset if needed (offline, about 5 s at 32²), prints per-split
counts and class balance, writes PNG grids of composited examples next to
their mask overlays (one row per category) to ``--out``, and the report
(:func:`nettransplant.data.report.data_report`) to ``--json``.
"""

from nettransplant.commands.data_report import main, run  # noqa: F401 - main: the command's API

if __name__ == "__main__":
    run()
