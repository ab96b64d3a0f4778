"""Every output comparison of a build, as polygraphy runners + one result type.

- torch (compressed model) vs model.onnx on ONNX Runtime: the export check (verify/fidelity.py's
  TorchRunner, a CPU/GPU-agnostic BaseRunner: polygraphy's PytRunner assumes CUDA);
- model.trt.onnx (fp16/bf16 graph for TensorRT) vs model.onnx, both on ONNX Runtime: checks the
  precision pass where the engine cannot run;
- the TensorRT engine (TrtRunner) vs model.onnx (OnnxrtRunner), where the engine can run.
Each is `compare(reference, candidate, feeds, output, atol, rtol)`: polygraphy's Comparator.run +
compare_accuracy with CompareFunc.simple, returning one `Comparison`. Polygraphy's logger severity is
restored afterwards (`quiet_polygraphy`), so callers' logging is never changed behind their back.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
from polygraphy.comparator import Comparator, CompareFunc


@dataclass
class Comparison:
    """Outcome of one runner-vs-runner check on the same inputs: |cand - ref| <= atol + rtol * |ref|."""

    passed: bool
    atol: float
    rtol: float
    max_abs: float
    max_rel: float
    mean_abs: float
    reference_max_abs: float
    iterations: int
    runners: tuple[str, str]
    error_stat: str = "elemwise"  # "mean": pass iff mean |diff| <= atol (quantized artifacts)

    @property
    def nan(self) -> bool:
        return self.max_abs != self.max_abs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"runners": list(self.runners), "nan": self.nan}


@contextlib.contextmanager
def quiet_polygraphy(severity: str = "ERROR") -> Iterator[None]:
    """Polygraphy's logger at `severity` inside the block, its previous state restored after."""
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = getattr(G_LOGGER, severity)
    try:
        yield
    finally:
        G_LOGGER.module_severity = old


def compare(reference: Any, candidate: Any, feeds: list[dict[str, np.ndarray]], outputs: list[str] | None,
            atol: float, rtol: float, error_stat: str = "elemwise") -> Comparison:
    """Run both polygraphy runners on `feeds`; statistics over `outputs` (None: every output)."""
    with quiet_polygraphy():
        results = Comparator.run([reference, candidate], data_loader=feeds)
        acc = Comparator.compare_accuracy(
            results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol, check_error_stat=error_stat))
    groups = [acc] if hasattr(acc, "values") else list(acc)  # newer polygraphy: a sequence of AccuracyResult
    keep = (lambda k: True) if outputs is None else (lambda k: k in outputs)  # noqa: E731
    stats = [v for g in groups for iters in g.values() for it in iters for k, v in it.items() if keep(k)]
    ref_runs = results[0][1]
    ref_max = max(float(np.abs(np.asarray(r[k], dtype=np.float64)).max()) for r in ref_runs for k in r.keys() if keep(k))
    return Comparison(
        passed=all(bool(g) for g in groups), atol=atol, rtol=rtol,
        max_abs=float(max(s.max_absdiff for s in stats)), max_rel=float(max(s.max_reldiff for s in stats)),
        mean_abs=float(np.mean([s.mean_absdiff for s in stats])), reference_max_abs=ref_max,
        iterations=len(feeds), runners=(reference.name, candidate.name), error_stat=error_stat)
