"""Progressive shrinking with knowledge distillation (``ofa train``)."""
from .config import PRESETS, ConfigError, Phase, TrainConfig, apply_overrides, load_config
from .loop import Trainer, train

__all__ = ["ConfigError", "PRESETS", "Phase", "TrainConfig", "Trainer", "apply_overrides", "load_config", "train"]
