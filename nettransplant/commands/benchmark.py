"""Step-time benchmark of back-distillation, side by side in one run, and its data-parallel scaling.

    nettransplant benchmark --quick --json bench.json      # CPU, < 2 min + the PyTorch section
    nettransplant benchmark --quick --device_counts 0 --json bench.json   # no scaling
    nettransplant benchmark --quick --cpu_devices 8 --json bench.json   # + 1..8 fake devices
    nettransplant benchmark --json bench_gpu.json          # VGG-16 at 224² (GPU)
    nettransplant benchmark --json bench_gpu.json --dtype bfloat16  # teachers in bf16

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

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from absl import flags

from nettransplant.benchmarks import scaling_benchmark, step_benchmark, torch_comparison
from nettransplant.configs import silhouettes, voc_vgg16
from nettransplant.runtime import cli, parallel

PROGRAM = "nettransplant benchmark"

# --quick: the embedded default's main adapter and the single-conv Exp. 3 adapter.
QUICK_ADAPTERS = ("exp1_1conv", "exp3")


def define_flags(values: flags.FlagValues) -> None:
    """The command's flags."""
    flags.DEFINE_boolean("quick", False, "CPU run at the embedded default's sizes (< 2 min)",
                         flag_values=values)
    flags.DEFINE_string("json", None, "write the results as JSON to this path",
                        flag_values=values)
    flags.DEFINE_list("adapters", None,
                      f"a subset of {', '.join(step_benchmark.ADAPTERS)} (default: "
                      f"{', '.join(QUICK_ADAPTERS)} with --quick, all otherwise)",
                      flag_values=values)
    flags.DEFINE_list("device_counts", None,
                      "device counts to scale over (default 1, 2, 4, … up to every device); "
                      "0 skips the scaling section", flag_values=values)
    flags.DEFINE_integer("cpu_devices", 0, "fake this many CPU devices (they share the same "
                         "cores)", flag_values=values)
    flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16"),
                      "the teachers' compute dtype in the scaling section", flag_values=values)
    flags.DEFINE_boolean("no_torch", False, "skip the JAX vs PyTorch section (skipped anyway "
                         "without PyTorch)", flag_values=values)
    flags.DEFINE_integer("torch_threads", None, "PyTorch's threads in that section (default: "
                         "its default, one per core)", flag_values=values)
    flags.DEFINE_integer("concurrent_cells", 2, "threads of the threads section (0 skips it)",
                         flag_values=values)
    flags.DEFINE_integer("runs_per_count", 2, "seeds per sample count in the runs section (0 "
                         "skips it)", flag_values=values)
    parallel.define_distributed_flags(values)


def parse(argv: Sequence[str] | None = None) -> flags.FlagValues:
    """The command's flags parsed from ``argv`` (``--help`` and bad flags exit)."""
    return cli.parse_flags(argv, define_flags, program=PROGRAM, doc=__doc__)


def run(values: flags.FlagValues) -> dict:
    """The benchmark of the parsed flags ``values``; returns its results."""
    for name in ("concurrent_cells", "runs_per_count", "cpu_devices"):
        if values[name].value < 0:
            raise cli.UsageError(f"--{name} must be >= 0, got {values[name].value}")
    if values.torch_threads is not None and values.torch_threads < 1:
        raise cli.UsageError(f"--torch_threads must be >= 1, got {values.torch_threads}")
    try:
        counts = (None if values.device_counts is None else
                  [int(n) for n in values.device_counts if int(n) > 0])
    except ValueError:
        raise cli.UsageError(f"--device_counts must be comma-separated integers, got "
                             f"{','.join(values.device_counts)!r}") from None
    names = list(values.adapters or (QUICK_ADAPTERS if values.quick
                                     else step_benchmark.ADAPTERS))
    unknown = [a for a in names if a not in step_benchmark.ADAPTERS]
    if unknown or not names:
        raise cli.UsageError(f"--adapters: unknown {unknown or names}; choose from "
                             f"{list(step_benchmark.ADAPTERS)}")
    if values.json:
        cli.check_output_folder(Path(values.json).parent, "--json")
    if values.cpu_devices:
        import jax
        jax.config.update("jax_num_cpu_devices", values.cpu_devices)  # before JAX starts
    parallel.initialize_from_flags(values)
    quick = values.quick
    config = silhouettes.get_config() if quick else voc_vgg16.get_config()
    steps, rounds = (10, 5) if quick else (20, 5)
    num_draws = 64 if quick else config.transplant.num_draws
    results = step_benchmark.run(config, mode="quick" if quick else "full", adapters=names,
                                 steps=steps, rounds=rounds, num_draws=num_draws)
    print(step_benchmark.format_table(results))
    adapter = "exp1_1conv" if "exp1_1conv" in names else names[0]
    if not values.no_torch:
        results["torch"] = torch_comparison.torch_section(
            config, adapter, steps=steps, rounds=rounds, num_draws=num_draws,
            torch_threads=values.torch_threads)
        print(torch_comparison.format_torch_table(results["torch"]))
    if values.concurrent_cells:
        results["threads"] = step_benchmark.threads_section(
            config, adapter, workers=values.concurrent_cells, fits=4,
            num_steps=20 if quick else 50, rounds=3, num_draws=num_draws)
        print(step_benchmark.format_threads_table(results["threads"]))
    if values.runs_per_count:
        section = step_benchmark.runs_section(
            config, "exp2", runs_per_count=values.runs_per_count,
            num_steps=20 if quick else 50, rounds=3, num_draws=num_draws)
        results["runs"] = section
        for key in ("transplant_problem_batched_s", "transplant_problem_one_at_a_time_s",
                    "transplant_runs", "transplant_compile_batched_s",
                    "transplant_compile_one_at_a_time_s"):
            results[key] = section[key]
        print(step_benchmark.format_runs_table(section))
    if counts != []:
        results["scaling"] = scaling_benchmark.run(
            config, device_counts=counts, steps=5 if quick else 10, rounds=3,
            num_draws=num_draws, compute_dtype=None if values.dtype == "float32" else
            values.dtype)
        print(scaling_benchmark.format_table(results["scaling"]))
    if values.json and parallel.is_primary():
        step_benchmark.write_json(results, values.json)
        print(f"wrote {values.json}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``nettransplant benchmark`` on ``argv`` (default ``sys.argv[1:]``); the exit code."""
    values = parse(argv)
    return cli.run_main(lambda: run(values))
