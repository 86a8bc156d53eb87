"""How to train: one recipe per mode, each taking a ``Job`` and returning a ``Trained`` (``job.py``).

- ``features.py``: a head on cached features of the frozen base(s), chosen on validation (``heads.py``);
- ``images.py``: ``frozen``, ``finetune`` and ``scratch``, trained on augmented images;
- ``auto.py``: features first, then a larger base and fine-tuning while the time budget allows (``plan.py``).
"""

from __future__ import annotations

from tlearn.recipes.auto import train_auto
from tlearn.recipes.features import train_features
from tlearn.recipes.images import train_finetune, train_frozen, train_scratch
from tlearn.recipes.job import Job, Trained
from tlearn.train import seeded

__all__ = ["Job", "Trained", "train"]


def train(job: Job) -> Trained:
    """Train in ``job.decision.mode``, seeded from ``job.train.seed`` (the caller's random state untouched)."""
    recipe = {"auto": train_auto, "features": train_features, "frozen": train_frozen, "finetune": train_finetune,
              "scratch": train_scratch}[job.decision.mode]
    with seeded(job.train.seed, job.run.device):
        return recipe(job)
