"""Step-time benchmark of back-distillation, side by side in one run, and its data-parallel scaling.

The body of ``python -m launch.benchmark``: it calls :func:`run`. Usage, and what the
command writes: the docstring of ``launch/benchmark.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nettransplant.benchmarks import scaling_benchmark, step_benchmark, torch_comparison
from nettransplant.configs import silhouettes, voc_vgg16
from nettransplant.runtime import cli, parallel

# --quick: the embedded default's main adapter and the single-conv Exp. 3 adapter.
QUICK_ADAPTERS = ("exp1_1conv", "exp3")


def main(argv: list[str] | None = None) -> dict:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CPU run at the embedded default's sizes (< 2 min)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--adapters", default=None,
                        help=f"comma-separated subset of {list(step_benchmark.ADAPTERS)} "
                             f"(default: {QUICK_ADAPTERS} with --quick, all otherwise)")
    parser.add_argument("--device_counts", "--device-counts", default=None,
                        help="comma-separated device counts to scale over (default 1, 2, 4, "
                             "… up to every device); 0 skips the scaling section")
    parser.add_argument("--cpu_devices", "--cpu-devices", type=int, default=0,
                        help="fake this many CPU devices (they share the same cores)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the teachers' compute dtype in the scaling section")
    parser.add_argument("--no_torch", "--no-torch", action="store_true",
                        help="skip the JAX vs PyTorch section (skipped anyway without PyTorch)")
    parser.add_argument("--torch_threads", "--torch-threads", type=int, default=None,
                        help="PyTorch's threads in that section (default: its default, one "
                             "per core)")
    parser.add_argument("--concurrent_cells", "--concurrent-cells", type=int, default=2,
                        help="threads of the threads section (default 2; 0 skips it)")
    parser.add_argument("--runs_per_count", "--runs-per-count", type=int, default=2,
                        help="seeds per sample count in the runs section (default 2; 0 "
                             "skips it)")
    parallel.add_distributed_arguments(parser)
    args = parser.parse_args(argv)
    if args.concurrent_cells < 0:
        parser.error(f"--concurrent_cells must be >= 0, got {args.concurrent_cells}")
    if args.runs_per_count < 0:
        parser.error(f"--runs_per_count must be >= 0, got {args.runs_per_count}")
    if args.cpu_devices < 0:
        parser.error(f"--cpu_devices must be >= 0, got {args.cpu_devices}")
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error(f"--torch_threads must be >= 1, got {args.torch_threads}")
    try:
        counts = (None if args.device_counts is None else
                  [int(n) for n in args.device_counts.split(",") if int(n) > 0])
    except ValueError:
        parser.error(f"--device_counts must be comma-separated integers, got "
                     f"{args.device_counts!r}")
    default = QUICK_ADAPTERS if args.quick else tuple(step_benchmark.ADAPTERS)
    names = [a for a in (args.adapters or ",".join(default)).split(",") if a]
    unknown = [a for a in names if a not in step_benchmark.ADAPTERS]
    if unknown or not names:
        parser.error(f"--adapters: unknown {unknown or names}; choose from "
                     f"{list(step_benchmark.ADAPTERS)}")
    if args.json:
        cli.check_output_folder(Path(args.json).parent, "--json")
    if args.cpu_devices:
        import jax
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before JAX starts
    parallel.initialize_from_args(args)
    config = silhouettes.get_config() if args.quick else voc_vgg16.get_config()
    steps, rounds = (10, 5) if args.quick else (20, 5)
    results = step_benchmark.run(
        config, mode="quick" if args.quick else "full", adapters=names, steps=steps,
        rounds=rounds, num_draws=64 if args.quick else config.transplant.num_draws)
    print(step_benchmark.format_table(results))
    if not args.no_torch:
        adapter = "exp1_1conv" if "exp1_1conv" in names else names[0]
        results["torch"] = torch_comparison.torch_section(
            config, adapter, steps=steps, rounds=rounds,
            num_draws=64 if args.quick else config.transplant.num_draws,
            torch_threads=args.torch_threads)
        print(torch_comparison.format_torch_table(results["torch"]))
    if args.concurrent_cells:
        results["threads"] = step_benchmark.threads_section(
            config, "exp1_1conv" if "exp1_1conv" in names else names[0],
            workers=args.concurrent_cells, fits=4, num_steps=20 if args.quick else 50,
            rounds=3, num_draws=64 if args.quick else config.transplant.num_draws)
        print(step_benchmark.format_threads_table(results["threads"]))
    if args.runs_per_count:
        section = step_benchmark.runs_section(
            config, "exp2",
            runs_per_count=args.runs_per_count, num_steps=20 if args.quick else 50,
            rounds=3, num_draws=64 if args.quick else config.transplant.num_draws)
        results["runs"] = section
        for key in ("transplant_problem_batched_s", "transplant_problem_one_at_a_time_s",
                    "transplant_runs", "transplant_compile_batched_s",
                    "transplant_compile_one_at_a_time_s"):
            results[key] = section[key]
        print(step_benchmark.format_runs_table(section))
    if counts != []:
        results["scaling"] = scaling_benchmark.run(
            config, device_counts=counts, steps=5 if args.quick else 10, rounds=3,
            num_draws=64 if args.quick else config.transplant.num_draws,
            compute_dtype=None if args.dtype == "float32" else args.dtype)
        print(scaling_benchmark.format_table(results["scaling"]))
    if args.json and parallel.is_primary():
        step_benchmark.write_json(results, args.json)
        print(f"wrote {args.json}")
    return results


def run() -> None:
    """The command on ``sys.argv``: what ``python -m launch.benchmark`` runs."""
    sys.exit(cli.run_main(main))
