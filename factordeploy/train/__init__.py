"""The ONE training loop of the package (recovery distillation, DSFormer's STF, future pretraining).

Generic: it knows parameters, a loss function, a fixed list of batches and an evaluation
function; never a model family, a layer kind or a compression method. See loop.py.
"""

from .loop import TrainConfig, TrainHooks, TrainResult, train

__all__ = ["TrainConfig", "TrainHooks", "TrainResult", "train"]
