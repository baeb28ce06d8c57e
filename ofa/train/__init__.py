"""Progressive shrinking with knowledge distillation (``ofa train``)."""
from .config import PRESETS, ConfigError, Phase, TrainConfig, apply_overrides, config_differences, load_config

__all__ = ["ConfigError", "PRESETS", "Phase", "TrainConfig", "Trainer", "apply_overrides", "config_differences",
           "load_config", "train"]


def __getattr__(name: str):
    # The trainer needs the training stack (safetensors, torchvision); the presets do not,
    # so `ofa profile` on a device builds its parser without them.
    if name in ("Trainer", "train"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
