"""Step-time benchmark of back-distillation, side by side in one run, and its data-parallel scaling.

    python -m launch.benchmark --quick --json bench.json      # CPU, < 2 min + the PyTorch section
    python -m launch.benchmark --quick --device_counts 0 --json bench.json   # no scaling
    python -m launch.benchmark --quick --cpu_devices 8 --json bench.json   # + 1..8 fake devices
    python -m launch.benchmark --json bench_gpu.json          # VGG-16 at 224² (GPU)
    python -m launch.benchmark --json bench_gpu.json --dtype bfloat16   # teachers in bf16

``--quick`` runs the embedded default's model sizes, adapter and S
(nettransplant/configs/silhouettes.py); the full mode runs
nettransplant/configs/voc_vgg16.py. The timing
protocol is :mod:`nettransplant.benchmarks.step_benchmark`'s; the scaling
section (step time, throughput and MFU per device count) is
:mod:`nettransplant.benchmarks.scaling_benchmark`'s. Where PyTorch is
installed, each method's step (direct-learn, distill, back-distill with 0
samples and with a batch, jacobian) is also timed beside the same step written
in PyTorch (:mod:`nettransplant.benchmarks.torch_reference`), with the Exp. 1
1-conv adapter (or the first of ``--adapters``); ``--no_torch`` skips that
section, and without PyTorch it is skipped with a one-line note. The threads
section times whole trainings one after another and in ``--concurrent_cells``
threads (the main job's ``config.concurrent_cells``; 0 skips it). The runs
section times one problem's runs (``--runs_per_count`` seeds at every sample
count) one at a time and batched on a runs axis (the main job's
``config.transplant.runs_axis``; 0 skips it); its headline keys are
``transplant_problem_batched_s``, ``transplant_problem_one_at_a_time_s``,
``transplant_runs`` and the two ways' compile seconds.
"""

from nettransplant.commands.benchmark import main, run  # noqa: F401 - main: the command's API

if __name__ == "__main__":
    run()
