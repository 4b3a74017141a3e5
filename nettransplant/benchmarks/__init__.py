"""Timings: the adapter step, scaling over devices, and the PyTorch reference steps.

* :mod:`~nettransplant.benchmarks.step_benchmark` — cached vs naive steps, threads, runs;
* :mod:`~nettransplant.benchmarks.torch_comparison` — the library's step beside PyTorch's;
* :mod:`~nettransplant.benchmarks.scaling_benchmark` — step time, throughput and MFU per
  device count;
* :mod:`~nettransplant.benchmarks.torch_reference` — the same steps written in PyTorch.
"""
