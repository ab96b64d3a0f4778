"""Structured attention replacing a trained model's attention core (Combiner); sits beside compress/."""

from ..ops.combiner_attention.reference import PATTERNS, CombinerConfig, combiner_attention
from .install import CHOICES, AttentionConfig, CombinerCore, check_attention, check_supported, default_block, install_combiner

__all__ = ["PATTERNS", "CHOICES", "AttentionConfig", "CombinerCore", "CombinerConfig", "check_attention", "check_supported",
           "combiner_attention", "default_block", "install_combiner"]
