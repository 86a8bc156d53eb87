"""Mode ``auto``: decide from measurements, within a time budget, and show the classic strategy table beside it.

The classic tutorials' table decides by training-set size:

| training images                  | what the table recommends                                        |
|----------------------------------|------------------------------------------------------------------|
| fewer than ``auto_small`` (1000) | features: a new head on the frozen base's cached features        |
| up to ``auto_large`` (10000)     | finetune: the head, then the top stage at lr/10                  |
| ``auto_large`` or more           | finetune every stage at lr/10 (the weights as a starting point)  |

tlearn shows that table and where the data falls in it, but decides from evidence instead. It always starts with
the cheap, cached ``features`` result, then estimates from the throughput it measured on this machine what each
further step would cost, and takes a step only while the time budget allows it:

1. features of the chosen base (and its mirror images), with the head chosen on validation (``heads.py``);
2. the features of a larger offline base, concatenated with the first (the step that bought the most accuracy per
   second in BENCHMARKS.md, so it comes before the fine-tuning steps);
3. fine-tuning the base's top stage and the head on cached activations (``top.py``), from the head of step 1,
   for as many epochs as the budget leaves;
4. fine-tuning the top stage of the base on images, from the head of step 1.

A step's result is kept only when it lowers the validation loss after temperature scaling (each model's own
temperature, fitted on the validation split), the one score on which a sharper fine-tuned model and a head on
features compare fairly, and by more than the noise: the mean change image by image must stay below zero by
more than its standard error (``auto._beats``). The plan, the estimates, the measured times and the outcome of
each step are saved in ``config.json`` and shown in the report.

On a CPU the default budget grows with the work: three times the estimated time of a whole ``--mode features``
run on this data and machine (``derived_budget``), so the default never takes much more than three times what
``--mode features`` takes, and the further steps run wherever they fit in that.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from tlearn.config import Decision, TrainConfig, parse_duration

# The default --time-budget of mode auto on a GPU, where fine-tuning is cheap; on a CPU it is derived from the
# data and this machine: BUDGET_FACTOR times the estimated time of a whole --mode features run.
DEFAULT_BUDGET = {"cuda": 1800.0}
BUDGET_FACTOR = 3.0
DERIVED = f"{BUDGET_FACTOR:g} x the estimated time of --mode features on this data and machine"
# A --mode features run chooses the head (PROBE), refits it with held-out folds for calibration and searches for
# mislabels, each about one head search; then evaluation on cached features, novelty, figures and the report.
FEATURES_RUN_PROBES = 3
AFTER_SECONDS = 10.0
# Fine-tuning's cost relative to extraction (the base in ONNX Runtime or under autocast), per image: a training
# image costs a forward and a backward pass in PyTorch with augmentation (8.6x on the reference 2-core CPU: 17 vs
# 147 img/s), a validation image one forward pass in PyTorch (about 2x). The first epoch's real time replaces
# these estimates for the epochs after it.
FINETUNE_TRAIN_COST, FINETUNE_VAL_COST = 9.0, 2.0
MIN_FINETUNE_EPOCHS = 2
# Fewer validation images than this cannot tell a better fine-tuned model from luck, so auto does not pay for it.
MIN_FINETUNE_EVIDENCE = 50
PROBE_SECONDS_PER_VALUE = 4e-6  # choosing the head: about this many seconds per training-feature value
REPORT_SECONDS = 5.0  # evaluation on cached features, metrics, figures and report.html
EPOCHS = ("top", "finetune")  # the kinds of step that train in epochs, and may stop early


TABLE = ("features, a head on the frozen base's features", "fine-tune the top stage at lr/10",
         "fine-tune every stage at lr/10")  # what each row of the strategy table recommends


def _table_rows(config: TrainConfig) -> list[str]:
    return [f"fewer than {config.auto_small} training images", f"up to {config.auto_large}",
            f"{config.auto_large} or more"]


def table_advice(n_train: int, n_classes: int, config: TrainConfig) -> tuple[int, str]:
    """The row of the strategy table the data falls in (0, 1, 2) and what it recommends."""
    row = 0 if n_train < config.auto_small else 1 if n_train < config.auto_large else 2
    per_class = f"{n_train} training images, {n_train / n_classes:.0f} per class"
    return row, f"{per_class}, in the row '{_table_rows(config)[row]}': {TABLE[row]}"


def format_table(n_train: int, n_classes: int, config: TrainConfig) -> str:
    """The strategy table with an arrow at the row the data falls in."""
    row, _ = table_advice(n_train, n_classes, config)
    return "\n".join(f"  {'->' if i == row else '  '} {size}: {advice}"
                     + (f"   <- your data: {n_train} images" if i == row else "")
                     for i, (size, advice) in enumerate(zip(_table_rows(config), TABLE, strict=True)))


def choose(n_train: int, n_classes: int, config: TrainConfig) -> Decision:
    """The mode to start from: the one asked for, or for ``auto`` the plan of ``train_auto`` (features first)."""
    if config.mode != "auto":
        return Decision(config.mode, config.unfreeze, config.lr_mult, f"--mode {config.mode} was asked for")
    _, advice = table_advice(n_train, n_classes, config)
    return Decision("auto", config.unfreeze, config.lr_mult,
                    "auto: features first, then further steps while the time budget allows, each kept only if it "
                    "lowers the calibrated validation loss by more than the noise", table=advice)


def budget_seconds(config: TrainConfig, device: str) -> tuple[float | None, str]:
    """The run's time budget in seconds (None: no limit) and where it came from."""
    asked = parse_duration(config.time_budget)
    if asked is not None:
        return asked, f"--time-budget {config.time_budget}"
    if config.time_budget.strip().lower() == "auto" and config.mode == "auto":
        if device == "cuda":
            return DEFAULT_BUDGET["cuda"], "the default for mode auto on a GPU"
        return None, DERIVED  # once the data is measured: derived_budget
    return None, "no limit"


def derives_budget(config: TrainConfig, device: str) -> bool:
    """Whether mode auto sets its own budget from measurements (``derived_budget``): the default on a CPU."""
    return config.mode == "auto" and config.time_budget.strip().lower() == "auto" and device != "cuda"


def features_run_estimate(m: Measured, elapsed: float) -> float:
    """Seconds a whole --mode features run would take here: what is spent already (scanning, checking, loading
    the base, measuring), extraction of every split's missing views, the head searches, and the rest."""
    return elapsed + m.misses / m.rate + FEATURES_RUN_PROBES * probe_estimate(m.n_train, m.num_features) \
        + AFTER_SECONDS


def derived_budget(m: Measured, elapsed: float) -> tuple[float, str]:
    """The default budget of mode auto on a CPU, and how it was derived, in words."""
    estimate = features_run_estimate(m, elapsed)
    return BUDGET_FACTOR * estimate, f"{DERIVED}, ~{estimate:.0f} s"


class Clock:
    """The time budget: seconds since the run started, and what is left of the budget."""

    def __init__(self, budget: float | None, start: float | None = None):
        self.budget, self.start = budget, time.perf_counter() if start is None else start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - self.elapsed()

    def deadline(self, reserve: float = 0.0) -> float | None:
        """The perf_counter() time by which a stage must end to leave ``reserve`` seconds, or None."""
        return None if self.budget is None else self.start + self.budget - reserve


@dataclass
class Step:
    """One step of the plan, with its estimate before and its measurements after."""

    name: str
    kind: str  # features | top | larger | finetune
    estimate: float  # seconds
    status: str = "planned"  # planned | skipped | kept | discarded
    why: str = ""
    seconds: float = 0.0
    val_loss: float | None = None
    val_accuracy: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "estimate_s": round(self.estimate, 1), "status": self.status,
                "why": self.why, "seconds": round(self.seconds, 1), "val_loss": self.val_loss,
                "val_accuracy": self.val_accuracy, **self.detail}


@dataclass
class Measured:
    """What the plan is estimated from: counts, cache misses and this machine's extraction throughput."""

    n_train: int
    n_val: int
    n_test: int
    num_features: int  # of the chosen base
    rate: float  # images per second through the chosen base (decode + forward), measured here
    misses: int  # images x views the chosen base still has to extract
    larger: str | None = None  # the larger offline base, if any
    larger_cost: float = 0.0  # its extraction time per image relative to the chosen base
    larger_misses: int = 0
    larger_features: int = 0
    top: tuple[float, float] | None = None  # seconds per training and validation sample of the top stage (None:
    # the base has no known split)
    top_extra: int = 0  # images x views whose top-stage input is not cached though their features are (a pass)
    views: int = 2  # views a head trains on: the centre crop and its mirror image, or the centre alone


def probe_estimate(n_train: int, num_features: int) -> float:
    """Seconds to choose a head on ``n_train`` images of ``num_features`` features (with mirror images)."""
    return 1.0 + PROBE_SECONDS_PER_VALUE * 2 * n_train * num_features


def finetune_epoch_estimate(m: Measured) -> float:
    return (m.n_train * FINETUNE_TRAIN_COST + m.n_val * FINETUNE_VAL_COST) / m.rate


def top_epoch_estimate(m: Measured) -> float:
    """Seconds of one epoch of fine-tuning the top stage on cached activations: every training image's views
    forward and backward, the validation images forward (twice: the loss, and the logits that select)."""
    train, val = m.top or (math.inf, math.inf)
    return m.n_train * m.views * train + 2 * m.n_val * val


def plan(m: Measured, clock: Clock, max_epochs: int, finetune: bool, small: int = 1000) -> list[Step]:
    """The steps of mode auto with their estimated times, each marked planned or skipped. Later steps are
    re-checked against the clock before they start, with the times measured by then."""
    steps = [Step("features of the chosen base (+ mirror images), head chosen on validation", "features",
                  m.misses / m.rate + probe_estimate(m.n_train, m.num_features))]
    if m.larger:
        steps.append(Step(f"+ features of the larger base {m.larger}", "larger",
                          m.larger_misses * m.larger_cost / m.rate
                          + probe_estimate(m.n_train, m.num_features + m.larger_features)))
    if finetune and m.top is not None:
        epoch = top_epoch_estimate(m)
        steps.append(Step(f"fine-tune the top stage on cached activations ({max_epochs} epochs at most, ~{epoch:.0f} "
                          "s each)", "top", m.top_extra / m.rate + epoch * max_epochs,
                          detail={"epoch_estimate_s": round(epoch, 1), "extract_s": round(m.top_extra / m.rate, 1)}))
    if finetune:
        epoch = finetune_epoch_estimate(m)
        steps.append(Step(f"fine-tune the top stage ({max_epochs} epochs at most, ~{epoch:.0f} s each)", "finetune",
                          epoch * max_epochs, detail={"epoch_estimate_s": round(epoch, 1)}))
    spent = steps[0].estimate  # the first step is always taken: it gives the model to beat
    for step in steps[1:]:
        fits, why = can_take(m, step, clock.left() - spent - evaluation_reserve(m), spent, small)
        if fits:
            spent += step.estimate
        else:
            step.status, step.why = "skipped", why
    return steps


def can_take(m: Measured, step: Step, left: float, spent: float, small: int) -> tuple[bool, str]:
    """Whether ``step`` may run with ``left`` seconds to spend after ``spent`` seconds on the steps before it,
    and if not, why: when planning (with estimates) and again just before the step (with measured times). What
    the data rules out is said before what the clock does, so the reason does not depend on the machine's load."""
    if step.kind in EPOCHS and m.n_val < MIN_FINETUNE_EVIDENCE:
        return worth_finetuning(m, step, spent, small)
    fits, why = affordable(step, left)
    if fits and step.kind in EPOCHS:
        fits, why = worth_finetuning(m, step, spent, small)
    return fits, why


def worth_finetuning(m: Measured, step: Step, spent: float, small: int) -> tuple[bool, str]:
    """Whether fine-tuning can earn its time. It needs enough validation images to show a gain; and on small data
    (the table's features row), where it rarely beats a good head on features, it must also be cheap: two epochs
    costing no more than the features steps took (so on a GPU it is tried, on a CPU it is not)."""
    anyway = "; --mode finetune trains it anyway" if step.kind == "finetune" else ""
    if m.n_val < MIN_FINETUNE_EVIDENCE:
        return False, (f"{m.n_val} validation images are too few to show whether fine-tuning helps (it needs "
                       f"{MIN_FINETUNE_EVIDENCE}){anyway}")
    two_epochs = step.detail["epoch_estimate_s"] * MIN_FINETUNE_EPOCHS
    if m.n_train < small and two_epochs > spent:
        return False, (f"small data ({m.n_train} < {small} training images) and 2 epochs would cost ~{two_epochs:.0f} "
                       f"s, more than the features steps (~{spent:.0f} s); --time-budget does not change this{anyway}")
    return True, ""


def evaluation_reserve(m: Measured) -> float:
    """Seconds kept back for evaluation and the report: test images through a fine-tuned model at worst."""
    return REPORT_SECONDS + (m.n_val + m.n_test) * FINETUNE_VAL_COST / m.rate


def affordable(step: Step, left: float) -> tuple[bool, str]:
    """Whether ``step`` fits in ``left`` seconds: all of it, or for fine-tuning at least two epochs."""
    need = step.estimate if step.kind not in EPOCHS else \
        step.detail.get("extract_s", 0.0) + step.detail["epoch_estimate_s"] * MIN_FINETUNE_EPOCHS
    if need <= left:
        return True, ""
    what = f"{MIN_FINETUNE_EPOCHS} epochs need" if step.kind in EPOCHS else "needs"
    return False, f"over budget: {what} ~{need:.0f} s, {max(left, 0):.0f} s left"


def format_plan(steps: list[Step]) -> str:
    lines = []
    for i, s in enumerate(steps, 1):
        done = f", took {s.seconds:.1f} s" if s.seconds else ""
        score = (f", val_loss {s.val_loss:.4f} (calibrated {s.detail['val_loss_calibrated']:.4f}), val_accuracy "
                 f"{s.val_accuracy:.4f}" if s.val_loss is not None and "val_loss_calibrated" in s.detail else
                 f", val_loss {s.val_loss:.4f}, val_accuracy {s.val_accuracy:.4f}" if s.val_loss is not None else "")
        lines.append(f"  {i}. {s.name}: ~{s.estimate:.0f} s: {s.status}{done}{score}"
                     + (f" ({s.why})" if s.why else ""))
    return "\n".join(lines)
