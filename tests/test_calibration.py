"""Calibration sampling (reproducible, disjoint from evaluation), Gram hooks and Fisher."""

from __future__ import annotations

import copy

import pytest
import torch

from factordeploy.compress.calibration import Calibration, CalibrationConfig
from factordeploy.models import text as textmod


def test_split_is_disjoint_by_article():
    cal, ev = textmod.calibration_articles(), textmod.evaluation_articles()
    assert cal and ev and not set(cal) & set(ev)


@pytest.mark.slow
def test_sampling_reproducible_and_seed_dependent(minilm):
    def windows(seed):
        return Calibration(minilm, CalibrationConfig(n=8, length=32, seed=seed)).windows()

    a, b, c = windows(0), windows(0), windows(1)
    assert a == b
    assert a != c
    assert all(len(w) == 32 for w in a)


def _ngram_hashes(stream: list[int], n: int) -> set[int]:
    return {hash(tuple(stream[i:i + n])) for i in range(len(stream) - n + 1)}


@pytest.mark.slow
def test_calibration_windows_never_appear_in_evaluation_text(minilm):
    n = 32
    eval_stream = minilm.token_ids(textmod.evaluation_articles())
    eval_hashes = _ngram_hashes(eval_stream, n)
    cal = Calibration(minilm, CalibrationConfig(n=64, length=n, seed=3)).windows()
    hits = sum(hash(tuple(w)) in eval_hashes for w in cal)
    assert hits == 0
    # positive control: windows drawn from the evaluation stream are detected
    control = textmod.sample_windows(eval_stream, 8, n, seed=3)
    assert all(hash(tuple(w)) in eval_hashes for w in control)


@pytest.mark.slow
def test_hook_grams_match_direct_inputs_and_are_shared(minilm, minilm_calib):
    model = minilm.model
    names = ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key",
             "encoder.layer.1.output.dense"]
    grams = minilm_calib.grams(model, names)
    assert grams[names[0]] is grams[names[1]]  # q and k read the same tensor: one Gram
    assert grams[names[2]].shape == (1536, 1536) and grams[names[2]].dtype == torch.float64
    seen: list[torch.Tensor] = []
    h = model.get_submodule(names[2]).register_forward_hook(lambda m, i, o: seen.append(i[0].detach().double()))
    try:
        with torch.no_grad():
            for batch in minilm_calib.batches():
                minilm.output(model, batch)
    finally:
        h.remove()
    X = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    assert X.shape[0] == 16 * 64
    torch.testing.assert_close(grams[names[2]], X.T @ X, rtol=1e-9, atol=1e-6)


@pytest.mark.slow
def test_fisher_encoder_needs_sampled_targets(minilm, minilm_calib):
    """At the original weights the distillation gradient is zero; sampled targets give a real Fisher."""
    from factordeploy.compress.fisher import fisher_diagonal, row_importance
    from factordeploy.compress.objective import TaskObjective

    model = copy.deepcopy(minilm.model)
    names = ["encoder.layer.0.attention.output.dense", "encoder.layer.3.output.dense"]
    obj = TaskObjective(minilm_calib, model)
    batch = next(iter(minilm_calib.batches()))
    loss = obj.loss(model, 0, batch)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-10)
    fisher = fisher_diagonal(model, names, minilm_calib, obj, reduce="row", seed=0)
    for n in names:
        f = fisher[n]
        assert f.shape == (model.get_submodule(n).out_features,)
        assert bool((f > 0).all())
        imp = row_importance(f)
        assert float(imp.max()) == pytest.approx(1 + 1e-5)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    # full per-weight Fisher sums to the row Fisher (same batches, same sampled targets)
    full = fisher_diagonal(model, names[:1], minilm_calib, obj, reduce="none", seed=0)[names[0]]
    torch.testing.assert_close(full.double().sum(1), fisher[names[0]], rtol=1e-5, atol=0)


def test_out_of_domain_texts_are_real_and_disjoint_from_calibration():
    from factordeploy.models import text as t

    calib = set(t.calibration_articles())
    for name in t.OUT_OF_DOMAIN:
        docs = t.domain_texts(name)
        assert len(docs) >= 50 and sum(len(d) for d in docs) > 300_000
        assert not calib.intersection(docs)
    assert "bushfire" in " ".join(t.domain_texts("news"))
    assert "def " in " ".join(t.domain_texts("pydoc"))
