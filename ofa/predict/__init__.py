"""Predictors the search can optimise or constrain: exact cost now; accuracy and latency later."""
from .cost import CostModel, count_macs_params

__all__ = ["CostModel", "count_macs_params"]
