"""Step-time benchmark of back-distillation, side by side in one run.

    python -m launch.benchmark --quick --json bench.json      # CPU, < 2 min
    python -m launch.benchmark --json bench_gpu.json          # VGG-16 at 224² (GPU)

``--quick`` runs the embedded default's model sizes, adapter and S
(configs/silhouettes.py); the full mode runs configs/voc_vgg16.py. The timing
protocol is :mod:`nettransplant.experiments.step_benchmark`'s.
"""

from __future__ import annotations

import argparse
import sys

from configs import silhouettes, voc_vgg16
from nettransplant.cli import run_main
from nettransplant.experiments import step_benchmark

# --quick: the embedded default's main adapter and the single-conv Exp. 3 adapter.
QUICK_ADAPTERS = ("exp1_1conv", "exp3")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CPU run at the embedded default's sizes (< 2 min)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--adapters", default=None,
                        help=f"comma-separated subset of {list(step_benchmark.ADAPTERS)} "
                             f"(default: {QUICK_ADAPTERS} with --quick, all otherwise)")
    args = parser.parse_args(argv)
    config = silhouettes.get_config() if args.quick else voc_vgg16.get_config()
    default = QUICK_ADAPTERS if args.quick else tuple(step_benchmark.ADAPTERS)
    names = [a for a in (args.adapters or ",".join(default)).split(",") if a]
    steps, rounds = (10, 5) if args.quick else (20, 5)
    results = step_benchmark.run(
        config, mode="quick" if args.quick else "full", adapters=names, steps=steps,
        rounds=rounds, num_draws=64 if args.quick else config.transplant.num_draws)
    print(step_benchmark.format_table(results))
    if args.json:
        step_benchmark.write_json(results, args.json)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    sys.exit(run_main(main))
