"""Training: stage 1 (degradation-aware extractors) and stage 2 (MegaSR), and export."""

from .config import MegaSRTrainConfig, load_config, save_config
from .train_megasr import MegaSRTrainer

__all__ = ["MegaSRTrainConfig", "MegaSRTrainer", "load_config", "save_config"]
