"""ONNX Runtime: sessions (CUDA provider when installed, else CPU), optimized model, latency."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..export.kv_cache import PAST
from ..export.onnx_files import check_onnx_file


def providers() -> list[str]:
    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


def session(path: str | Path, optimized_out: str | Path | None = None, threads: int = 0) -> ort.InferenceSession:
    """A session; if `optimized_out` is given, ORT writes its optimized graph there (portable level)."""
    check_onnx_file(path)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if optimized_out is not None:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized_out)
    return ort.InferenceSession(str(path), so, providers=providers())


def random_feeds(input_names: list[str], batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for n in input_names:
        if n == "input_ids":
            feeds[n] = rng.integers(100, max(vocab, 101), size=(batch, seq), dtype=np.int64)
        elif n == "attention_mask":
            feeds[n] = np.ones((batch, seq), dtype=np.int64)
        else:
            feeds[n] = np.zeros((batch, seq), dtype=np.int64)
    return feeds


def session_feeds(sess: ort.InferenceSession, batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every input of `sess` at (batch, seq); a KV-cache graph gets past length 0
    (the first pass over a prompt of `seq` tokens)."""
    names = [i.name for i in sess.get_inputs()]
    feeds = random_feeds([n for n in names if n != "position_ids" and not n.startswith("past_")], batch, seq, vocab, seed)
    for i in sess.get_inputs():
        if i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        elif i.name.startswith("past_"):
            shape = [batch if ax == 0 else 0 if d == PAST else d for ax, d in enumerate(i.shape)]
            feeds[i.name] = np.zeros(shape, np.float32)
    return feeds


@dataclass
class Latency:
    batch: int
    seq: int
    median_ms: float
    p90_ms: float
    runs: int


def measure_latency(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int = 20,
                    warmup: int = 2, budget_s: float = 15.0, min_runs: int = 5) -> Latency:
    """Median and p90 wall time of up to `runs` inferences after `warmup`.

    Stops early once `budget_s` is spent (but never before `min_runs`), so a large model on a
    small CPU reports a median over fewer runs instead of taking many minutes; the report
    states the run count.
    """
    for _ in range(warmup):
        sess.run(None, feeds)
    times: list[float] = []
    start = time.perf_counter()
    for i in range(runs):
        if i >= min_runs and time.perf_counter() - start > budget_s:
            break
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    b, s = next(iter(feeds.values())).shape
    return Latency(int(b), int(s), round(statistics.median(times), 3),
                   round(times[min(len(times) - 1, int(0.9 * len(times)))], 3), len(times))


def interleaved_latency(paths: list[str | Path], batch: int, seq: int, vocab: int, rounds: int = 10,
                        runs_per_round: int = 3, threads: int = 0) -> list[float]:
    """Latency (ms) of several models measured in alternation: the median over rounds of each round's median.

    On a shared CPU a neighbour's load comes and goes; alternating short rounds spreads it over
    all models alike, so the figures are comparable with each other. The median over rounds was
    steadier than the best round (measured on MiniLM under load: two files of identical compute
    stayed within 5% of each other across repeats, the best round differed by up to 2x).
    """
    sessions = [session(p, threads=threads) for p in paths]
    feeds = [session_feeds(sess, batch, seq, vocab) for sess in sessions]  # same seed: same tokens for all
    per_round: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, sess in enumerate(sessions):
            per_round[i].append(measure_latency(sess, feeds[i], runs_per_round, warmup=1).median_ms)
    return [round(statistics.median(r), 3) for r in per_round]
