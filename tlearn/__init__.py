"""tlearn: a folder of images → a trained, evaluated and deployable image classifier, by transfer learning."""

from typing import Any

__version__ = "0.1.0"

from tlearn.config import BackboneConfig, DataConfig, RuntimeConfig, TlearnError, TrainConfig

__all__ = ["BackboneConfig", "DataConfig", "ImageClassifier", "RuntimeConfig", "TlearnError", "TrainConfig",
           "__version__", "check_data", "predict_imagenet"]


def __getattr__(name: str) -> Any:
    """``ImageClassifier`` and ``predict_imagenet`` import torch, so they load on first use (PEP 562): commands
    that need neither, such as ``tlearn check``, start in a fraction of the time. So does ``check_data`` (``tlearn
    check`` as a function, from ``survey.py``), through the API. (``tlearn compare`` as a function is
    ``tlearn.compare.compare_models``.)"""
    if name in ("ImageClassifier", "predict_imagenet", "check_data"):
        from tlearn import api

        return getattr(api, name)
    raise AttributeError(f"module 'tlearn' has no attribute {name!r}")
