"""Why a run does not fit its own labelled samples: one cell of the main job, retrained
with other optimisers, budgets and initialisations.

The main job trains every method with one optimiser and one budget
(``config.transplant``), and ``train_fit`` shows which runs did not fit their
samples (with the attempt kept; the probe retrains a run's first attempt).
:func:`probe` retrains one such cell (experiment, target, method,
sample count) from the same labelled samples, transplant problem and seed with
each of several optimisers (:class:`OptimizerSpec`), and reports per run: the
train and validation metric (:func:`nettransplant.data.validation_set`: training
images no run's labelled samples include; the test split is never shown), the
loss curve, the share of the adapter's outputs that are active on the samples,
and, for classification, the student's logits on the positive and the negative
samples — enough to tell a budget that is too short
from a run that has settled where no sample crosses the decision boundary.

The teachers come from (or are trained into) ``workdir/teachers`` exactly as the
main job's, so pointing it at a main job's workdir reuses that job's teachers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import optax

from nettransplant import data
from nettransplant.data import benchmarks
from nettransplant.experiments import cells as cells_lib
from nettransplant.experiments import paper
from nettransplant.experiments.cell_training import jacobian_weights
from nettransplant.experiments.runner import Runner
from nettransplant.experiments.zoo import TeacherZoo, generic_name
from nettransplant.runtime.progress import progress_bar
from nettransplant.transplant import problem

EXPERIMENTS = ("exp1_1conv", "exp1_3conv", "exp2", "exp3", "table4_classification",
               "table4_segmentation")
INITS = ("random", "identity")
OPTIMIZERS = ("adam", "adam_warmup_cosine", "adam_clip", "sgd_momentum")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """``name@learning_rate``, e.g. ``adam@1e-2``.

    ``adam``: optax's Adam (the main job's); ``adam_warmup_cosine``: Adam with a
    linear warm-up over the first tenth of the steps and a cosine decay to 5 % of
    the rate; ``adam_clip``: Adam after clipping the global gradient norm to 1;
    ``sgd_momentum``: SGD with momentum 0.9.
    """

    name: str
    learning_rate: float

    @classmethod
    def parse(cls, text: str) -> OptimizerSpec:
        name, sep, rate = text.strip().partition("@")
        if not sep or name not in OPTIMIZERS:
            raise ValueError(f"optimizer {text!r}: expected NAME@RATE with NAME one of "
                             f"{', '.join(OPTIMIZERS)} (e.g. adam@1e-2)")
        try:
            learning_rate = float(rate)
        except ValueError:
            raise ValueError(f"optimizer {text!r}: the rate {rate!r} is not a number") from None
        if not learning_rate > 0:
            raise ValueError(f"optimizer {text!r}: the rate must be > 0")
        return cls(name, learning_rate)

    def __str__(self) -> str:
        return f"{self.name}@{self.learning_rate:g}"

    def build(self, num_steps: int) -> optax.GradientTransformation:
        lr = self.learning_rate
        if self.name == "adam":
            return optax.adam(lr)
        if self.name == "adam_warmup_cosine":
            return optax.adam(optax.warmup_cosine_decay_schedule(
                0.0, lr, max(1, num_steps // 10), num_steps, 0.05 * lr))
        if self.name == "adam_clip":
            return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
        return optax.sgd(lr, momentum=0.9)


@dataclasses.dataclass
class Cell:
    """One transplant problem of the main job and its labelled samples."""

    config: object
    runner: Runner
    experiment: str
    target: str
    num_samples: int
    problem: problem.TransplantProblem
    warm_start: dict
    labelled: object
    validation: tuple  # (features, targets) of the validation split (data.validation_set)


def build_cell(config, workdir: Path | str, experiment: str, target: str, num_samples: int,
               progress: bool = False) -> Cell:
    """The main job's problem for ``experiment`` and ``target``, its closed-form warm
    start and its ``num_samples`` labelled samples (teachers in ``workdir/teachers``).

    Raises:
      ValueError: an unknown experiment, a target the config does not transplant
        there, or a sample count outside ``1 … max(config.sample_counts)``.
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment {experiment!r}: expected one of {', '.join(EXPERIMENTS)}")
    targets = (config.categories if experiment.startswith("exp1")
               else config.target_categories)
    if target not in targets:
        raise ValueError(f"target {target!r}: {experiment} transplants {', '.join(targets)}")
    largest = max(config.sample_counts)
    if not 1 <= num_samples <= largest:
        raise ValueError(f"samples {num_samples}: expected 1 … {largest} "
                         "(config.sample_counts)")
    benchmark = benchmarks.make_benchmark(config)
    zoo = TeacherZoo(config, Path(workdir), benchmark, progress)
    net = paper.train_teachers(config, zoo, progress)  # those of a finished run: read back
    generic = config.generic_category
    runner = Runner(config, net, benchmark, progress_bar(1, "probe", enabled=False),
                    cells_lib.CellStore(Path(workdir)))
    if experiment.startswith("exp1"):
        own = net.task_ref(f"{target}.classification")
        built = runner.problem(experiment, config.adapters[experiment], "exp1", target, own,
                               own, 1.0)
    else:
        # Exps. 2-3 transplant to the generic category's task modules, Table 4 to the
        # leave-one-out module of the target (the main job's wiring, paper.transplant_seed).
        task = "segmentation" if experiment in ("exp3", "table4_segmentation") \
            else "classification"
        protocol = "exp3" if task == "segmentation" else "exp2"
        if experiment.startswith("table4"):
            student, sources = generic_name(target), benchmark.leave_one_out_categories(target)
        else:
            student, sources = generic, [generic]
        built = runner.problem(experiment, config.adapters[protocol], protocol, target,
                               net.task_ref(f"{student}.{task}"),
                               net.task_ref(f"{target}.{task}"),
                               runner.beta(student, sources, target))
    prob, warm_start, _, _ = built
    view = data.validation_set(runner.view(experiment, prob.task, target, "train"), largest,
                               seed=runner.seed)
    validation = (problem.features(prob.transplant.category_module,
                                   prob.frozen["category_module"],
                                   data.normalize_images(view.images)),
                  prob.task.targets(view))
    return Cell(config, runner, experiment, target, num_samples, prob, warm_start,
                runner.labelled(prob, experiment, target, num_samples), validation)


def job_optimizer(cell: Cell) -> OptimizerSpec:
    """The main job's optimiser for ``cell``: Adam at its task's rate
    (:meth:`nettransplant.transplant.protocol.Protocol.rate`)."""
    return OptimizerSpec("adam", cell.runner.trainer.protocol.rate(cell.problem.task.name))


def probe(cell: Cell, method: str, optimizers, num_steps: int, init: str = "random"
          ) -> list[dict]:
    """Train ``method`` on ``cell`` once per optimiser; one record per run.

    ``init``: ``"random"`` (the main job's seeded initialisation of every row but
    back-distill), ``"identity"`` (:func:`nettransplant.transplant.problem.identity_adapter`);
    back-distill itself starts at the closed-form warm start, as in the main job.
    """
    if init not in INITS:
        raise ValueError(f"init {init!r}: expected one of {', '.join(INITS)}")
    prob, n = cell.problem, cell.num_samples
    methods = problem.methods_for(prob.task) + (cells_lib.RANDOM_INIT,)
    if method not in methods:
        raise ValueError(f"method {method!r}: {cell.experiment} runs {', '.join(methods)}")
    if method == "back-distill":
        start = cell.warm_start
    else:
        start = (problem.identity_adapter(prob.transplant) if init == "identity"
                 else prob.adapter_init)
    positives = np.asarray(cell.labelled.labels)[:n] == 1
    records = []
    for spec in optimizers:
        spec = spec if isinstance(spec, OptimizerSpec) else OptimizerSpec.parse(spec)
        steps = problem.StepCache(spec.build(num_steps), mesh=cell.runner.mesh,
                                  weights=jacobian_weights(cell.config))
        params, history = cell.runner.trainer.fit(
            prob, method, cell.labelled, n, start,
            f"probe {cell.experiment} {cell.target} {method} n={n} {spec}", None,
            steps=steps, num_steps=num_steps)
        record = {"optimizer": str(spec), "init": init if method != "back-distill"
                  else "warm_start", "steps": num_steps,
                  "train_fit": float(problem.training_fit(prob, params, cell.labelled, n)),
                  "validation": float(problem.score(prob, params, *cell.validation)),
                  "losses": [h["loss"] for h in history],
                  "active_start": _active(prob, start, cell.labelled.features[:n]),
                  "active_end": _active(prob, params, cell.labelled.features[:n])}
        if prob.task.name == "classification":
            logits = _logits(prob, params, cell.labelled.features[:n])
            record["logits_positive"] = [float(v) for v in logits[positives]]
            record["logits_negative"] = [float(v) for v in logits[~positives]]
        records.append(record)
    return records


def _active(prob, params, x) -> float:
    h, _ = prob.transplant.adapter.apply({"params": params}, x, beta=prob.scalars.beta)
    return float(np.mean(np.asarray(h) > 0))


def _logits(prob, params, x) -> np.ndarray:
    y = prob.transplant.student_output(params, prob.frozen, x, prob.scalars.beta)
    return np.asarray(y).reshape(x.shape[0], -1)[:, 0]


def table(cell: Cell, method: str, records: list[dict]) -> str:
    """A Markdown table of :func:`probe`'s records."""
    metric = cell.problem.task.metric_name
    lines = [f"{cell.experiment} {cell.target} {method}, {cell.num_samples} samples "
             f"({metric})", "",
             "| optimizer | init | steps | train | validation | first → last loss | active "
             "start → end | logits + / − (mean) |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        loss = (f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f}" if r["losses"] else "")
        logits = (f"{np.mean(r['logits_positive']):.2f} / {np.mean(r['logits_negative']):.2f}"
                  if "logits_positive" in r else "")
        lines.append(f"| {r['optimizer']} | {r['init']} | {r['steps']} | "
                     f"{r['train_fit']:.1f} | {r['validation']:.1f} | {loss} | "
                     f"{100 * r['active_start']:.0f} % → {100 * r['active_end']:.0f} % | "
                     f"{logits} |")
    return "\n".join(lines)
