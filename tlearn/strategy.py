"""Mode ``auto``: the transfer-learning strategy table, by training-set size.

| training images                  | mode      | what is trained                                           |
|----------------------------------|-----------|-----------------------------------------------------------|
| fewer than ``auto_small`` (1000) | features  | a new head on the frozen base's cached features           |
| up to ``auto_large`` (10000)     | finetune  | the head, then the top stage at lr/10                     |
| ``auto_large`` or more           | finetune  | the head, then every stage at lr/10 (weights as a start)  |

Fine-tuned stages get about a tenth of the head's learning rate and deeper ones about a hundredth
(``--lr-mult``), as the table recommends.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlearn.config import TrainConfig


@dataclass
class Decision:
    mode: str
    unfreeze: str
    lr_mult: str
    reason: str


def choose(n_train: int, n_classes: int, config: TrainConfig) -> Decision:
    """The mode to train in; for ``mode="auto"`` chosen from the number of training images."""
    if config.mode != "auto":
        return Decision(config.mode, config.unfreeze, config.lr_mult, f"--mode {config.mode} was asked for")
    per_class = f"{n_train} training images, {n_train / n_classes:.0f} per class"
    if n_train < config.auto_small:
        return Decision("features", config.unfreeze, config.lr_mult,
                        f"auto: {per_class} (< --auto-small {config.auto_small}): small data, so only a new head "
                        "is trained, on the frozen base's features")
    if n_train < config.auto_large:
        return Decision("finetune", "1", config.lr_mult,
                        f"auto: {per_class} (< --auto-large {config.auto_large}): medium data, so the head and "
                        "then the base's top stage are trained")
    return Decision("finetune", "all", "0.1,0.1",
                    f"auto: {per_class} (>= --auto-large {config.auto_large}): large data, so every stage is "
                    "fine-tuned at a tenth of the head's learning rate")
