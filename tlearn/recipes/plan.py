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

1. features of the chosen base (and its mirror images), with the head chosen on validation (``probe.py``);
2. the features of a larger offline base, concatenated with the first;
3. fine-tuning the top stage of the base, from the head of step 1.

A step's result is kept only when it lowers the validation loss. The plan, the estimates, the measured times and
the outcome of each step are saved in ``config.json`` and shown in the report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from tlearn.config import Decision, TrainConfig, parse_duration

# The default --time-budget of mode auto: a CPU user gets an answer in minutes; on a GPU fine-tuning is cheap.
DEFAULT_BUDGET = {"cpu": 180.0, "cuda": 1800.0}
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
                    "lowers the validation loss", table=advice)


def budget_seconds(config: TrainConfig, device: str) -> tuple[float | None, str]:
    """The run's time budget in seconds (None: no limit) and where it came from."""
    asked = parse_duration(config.time_budget)
    if asked is not None:
        return asked, f"--time-budget {config.time_budget}"
    if config.time_budget.strip().lower() == "auto" and config.mode == "auto":
        where = "cuda" if device == "cuda" else "cpu"
        return DEFAULT_BUDGET[where], f"the default for mode auto on a {'GPU' if where == 'cuda' else 'CPU'}"
    return None, "no limit"


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
    kind: str  # features | larger | finetune
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


def probe_estimate(n_train: int, num_features: int) -> float:
    """Seconds to choose a head on ``n_train`` images of ``num_features`` features (with mirror images)."""
    return 1.0 + PROBE_SECONDS_PER_VALUE * 2 * n_train * num_features


def finetune_epoch_estimate(m: Measured) -> float:
    return (m.n_train * FINETUNE_TRAIN_COST + m.n_val * FINETUNE_VAL_COST) / m.rate


def plan(m: Measured, clock: Clock, max_epochs: int, finetune: bool, small: int = 1000) -> list[Step]:
    """The steps of mode auto with their estimated times, each marked planned or skipped. Later steps are
    re-checked against the clock before they start, with the times measured by then."""
    steps = [Step("features of the chosen base (+ mirror images), head chosen on validation", "features",
                  m.misses / m.rate + probe_estimate(m.n_train, m.num_features))]
    if m.larger:
        steps.append(Step(f"+ features of the larger base {m.larger}", "larger",
                          m.larger_misses * m.larger_cost / m.rate
                          + probe_estimate(m.n_train, m.num_features + m.larger_features)))
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
    and if not, why: when planning (with estimates) and again just before the step (with measured times)."""
    fits, why = affordable(step, left)
    if fits and step.kind == "finetune":
        fits, why = worth_finetuning(m, step, spent, small)
    return fits, why


def worth_finetuning(m: Measured, step: Step, spent: float, small: int) -> tuple[bool, str]:
    """Whether fine-tuning can earn its time. It needs enough validation images to show a gain; and on small data
    (the table's features row), where it rarely beats a good head on features, it must also be cheap: two epochs
    costing no more than the features steps took (so on a GPU it is tried, on a CPU it is not)."""
    if m.n_val < MIN_FINETUNE_EVIDENCE:
        return False, (f"{m.n_val} validation images are too few to show whether fine-tuning helps (it needs "
                       f"{MIN_FINETUNE_EVIDENCE}); --mode finetune trains it anyway")
    two_epochs = step.detail["epoch_estimate_s"] * MIN_FINETUNE_EPOCHS
    if m.n_train < small and two_epochs > spent:
        return False, (f"small data ({m.n_train} < {small} training images) and 2 epochs would cost ~{two_epochs:.0f} "
                       f"s, more than the features steps (~{spent:.0f} s); --time-budget does not change this, "
                       "--mode finetune trains it anyway")
    return True, ""


def evaluation_reserve(m: Measured) -> float:
    """Seconds kept back for evaluation and the report: test images through a fine-tuned model at worst."""
    return REPORT_SECONDS + (m.n_val + m.n_test) * FINETUNE_VAL_COST / m.rate


def affordable(step: Step, left: float) -> tuple[bool, str]:
    """Whether ``step`` fits in ``left`` seconds: all of it, or for fine-tuning at least two epochs."""
    need = step.estimate if step.kind != "finetune" else step.detail["epoch_estimate_s"] * MIN_FINETUNE_EPOCHS
    if need <= left:
        return True, ""
    what = f"{MIN_FINETUNE_EPOCHS} epochs need" if step.kind == "finetune" else "needs"
    return False, f"over budget: {what} ~{need:.0f} s, {max(left, 0):.0f} s left"


def format_plan(steps: list[Step]) -> str:
    lines = []
    for i, s in enumerate(steps, 1):
        done = f", took {s.seconds:.1f} s" if s.seconds else ""
        score = (f", val_loss {s.val_loss:.4f}, val_accuracy {s.val_accuracy:.4f}" if s.val_loss is not None
                 else "")
        lines.append(f"  {i}. {s.name}: ~{s.estimate:.0f} s: {s.status}{done}{score}"
                     + (f" ({s.why})" if s.why else ""))
    return "\n".join(lines)
