"""What every run shares: devices, files, progress, metric logs, command-line errors.

* :mod:`~nettransplant.runtime.parallel` — device mesh, shardings, multi-host start;
* :mod:`~nettransplant.runtime.files` — files replaced whole;
* :mod:`~nettransplant.runtime.progress` — progress bars and messages;
* :mod:`~nettransplant.runtime.metric_writers` — metric logs (JSON lines, TensorBoard);
* :mod:`~nettransplant.runtime.cli` — one-line errors and exit codes;
* :mod:`~nettransplant.runtime.config_checks` — config field checks, each naming its field.
"""
