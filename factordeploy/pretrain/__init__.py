"""Pretraining a small LLaMA-shaped model from scratch with dense, low-rank, SLTrain or LOST weights.

`deploy pretrain --arch llama --params 20M --param dense|lowrank|sltrain|lost --tokens N --out DIR`
builds the architecture (arch.py), re-parametrises its attention and MLP linears with the layer
vocabulary of compress/layers.py (param.py), trains it with THE training loop (train/) on the
calibration split of the packaged Wikipedia text, evaluates perplexity in domain (wiki held-out)
and out of domain (news, pydoc), and writes a plain Hugging Face folder (the factorized weights
multiplied out) that `deploy build --model DIR` accepts (run.py).
"""

from .run import PretrainConfig, PretrainResult, run_pretrain

__all__ = ["PretrainConfig", "PretrainResult", "run_pretrain"]
