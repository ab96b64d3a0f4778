"""models/: load a model + tokenizer + example inputs (registry names or local HF folders)."""

from .registry import REGISTRY, LoadedModel, load_model

__all__ = ["REGISTRY", "LoadedModel", "load_model"]
