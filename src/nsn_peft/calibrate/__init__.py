"""Calibration: per-layer input (``XᵀX``) and output-gradient statistics, collected by hooks and stored compactly."""

from __future__ import annotations

from .collect import calibration_targets, collect_activation_stats, collect_gradient_stats
from .stats import ActivationStats

__all__ = ["ActivationStats", "calibration_targets", "collect_activation_stats", "collect_gradient_stats"]
