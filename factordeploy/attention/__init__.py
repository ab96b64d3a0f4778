"""Structured attention replacing a trained model's attention core (Combiner); sits beside compress/."""

from .combiner import PATTERNS, CombinerConfig, combiner_attention
from .install import CHOICES, AttentionConfig, CombinerAttention, check_attention, check_supported, default_block, install_combiner

__all__ = ["PATTERNS", "CHOICES", "AttentionConfig", "CombinerAttention", "CombinerConfig", "check_attention", "check_supported",
           "combiner_attention", "default_block", "install_combiner"]
