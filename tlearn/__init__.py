"""tlearn: a folder of images → a trained, evaluated and deployable image classifier, by transfer learning."""

__version__ = "0.1.0"

from tlearn.api import ImageClassifier, predict_imagenet
from tlearn.config import BackboneConfig, DataConfig, RuntimeConfig, TlearnError, TrainConfig

__all__ = ["BackboneConfig", "DataConfig", "ImageClassifier", "RuntimeConfig", "TlearnError", "TrainConfig",
           "__version__", "predict_imagenet"]
