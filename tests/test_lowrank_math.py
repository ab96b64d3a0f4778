"""Factor shapes, byte accounting and SVD error against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from factordeploy.compress.base import CompressContext, get_method
from factordeploy.compress.budget import max_useful_rank, uniform_rank
from factordeploy.compress.layers import LowRankLinear, layer_bytes
from factordeploy.compress.linalg import truncated_svd


def test_uniform_rank_hand_values():
    # 384x384 at ratio 0.5: floor(0.5 * 384*384 / 768) = 96 ; bytes 96*(384+384)*4 = 294912 = half of 589824
    assert uniform_rank(384, 384, 0.5) == 96
    # 1536x384: floor(0.5 * 589824 / 1920) = floor(153.6) = 153
    assert uniform_rank(1536, 384, 0.5) == 153
    # ratio 0.2 on 576x576: floor(0.8 * 331776 / 1152) = floor(230.4) = 230
    assert uniform_rank(576, 576, 0.2) == 230
    # tiny ratio: rank capped so factors stay strictly smaller than dense
    assert uniform_rank(8, 8, 0.01) == max_useful_rank(8, 8) == 3


def test_lowrank_layer_shapes_and_bytes():
    A, B = torch.randn(5, 12), torch.randn(7, 5)
    layer = LowRankLinear(A, B, torch.randn(7))
    assert (layer.in_features, layer.out_features, layer.rank) == (12, 7, 5)
    assert layer.stored_bytes() == (5 * 12 + 7 * 5) * 4
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(layer(x), x @ (B @ A).T + layer.bias)
    assert layer_bytes(nn.Linear(12, 7)) == 12 * 7 * 4


def test_svd_error_equals_discarded_singular_values():
    torch.manual_seed(0)
    W = torch.randn(40, 30, dtype=torch.float64)
    S = torch.linalg.svdvals(W)
    for r in (1, 7, 29):
        f = truncated_svd(W, r)
        err = torch.linalg.norm(W - f.B @ f.A)
        assert math.isclose(float(err), float(S[r:].norm()), rel_tol=1e-9)
        assert f.A.shape == (r, 30) and f.B.shape == (40, r)


def test_svd_method_meets_budget_and_keeps_too_small_layers_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 256), nn.Linear(256, 1))
    res = get_method("svd").compress(model, ["0", "2", "3"], CompressContext(ratio=0.5))
    kinds = {r.name: r.after["kind"] for r in res.layers}
    assert kinds == {"0": "lowrank", "2": "lowrank", "3": "dense"}  # 256x1: rank 1 costs 257 > 256 floats
    assert model[0].rank == 16  # floor(0.5 * 4096 / 128)
    assert model[2].rank == 25  # floor(0.5 * 16384 / 320)
    assert res.bytes_before == (64 * 64 + 64 * 256 + 256) * 4
    assert res.bytes_after == (16 * 128 + 25 * 320 + 256) * 4
    r3 = next(r for r in res.layers if r.name == "3")
    assert r3.bytes_after == r3.bytes_before == 256 * 4


def test_stays_dense_when_factored_form_not_smaller():
    assert uniform_rank(1, 100, 0.5) == 0  # any rank >= 1 costs 101 floats > 100


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_uniform_budget_removes_at_least_ratio(ratio):
    for out_f, in_f in [(384, 384), (1536, 384), (576, 1536)]:
        r = uniform_rank(out_f, in_f, ratio)
        assert r * (out_f + in_f) <= (1 - ratio) * out_f * in_f
        assert (r + 1) * (out_f + in_f) > (1 - ratio) * out_f * in_f  # the largest such rank
