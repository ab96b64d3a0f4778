"""Recovery: distil a compressed model back toward the original through adapters merged into its factors."""

from .adapters import ADAPTERS, AdapterConfig, AdapterSet, attach, factors_of
from .stage import RecoveryConfig, capture_teacher, check_recovery_config, recover

__all__ = ["ADAPTERS", "AdapterConfig", "AdapterSet", "attach", "factors_of", "RecoveryConfig", "capture_teacher",
           "check_recovery_config", "recover"]
