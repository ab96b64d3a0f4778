"""The ONNX Runtime cost model every op's lowering choice uses (one set of numbers for this CPU)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CostModel:
    """ONNX Runtime on this CPU as three numbers, fitted to single-thread measurements.

    Measured (ORT 1.32, 1 thread, fp32, median of 10): 384->384 layer with k=120, s=57 at
    M = 1/16/128/1024 tokens: dense MatMul 16/43/270/6637 us, gather decomposition
    133/962/10816/72013 us; 384->1536 (k=230, s=107): dense 124/236/1752/15363 us, gather
    1996/12188/66907/562346 us. GEMMs run near 1e11 FLOP/s, while Gather/Mul/ReduceSum on the
    (s, out, M) intermediate cost about 1 ns per element each.
    """

    flops_per_s: float = 1e11
    bytes_per_s: float = 1e10
    elementwise_per_s: float = 1e9
    tokens: int = 128  # reference M: the build's latency points use sequences of 128

    def time(self, flops: float, nbytes: float) -> float:
        return max(flops / self.flops_per_s, nbytes / self.bytes_per_s)
