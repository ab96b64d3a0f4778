"""Shared fixtures: one MiniLM load and one small calibration set per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm():
    from factordeploy.models.registry import load_model

    return load_model("minilm")


@pytest.fixture(scope="session")
def minilm_calib(minilm):
    from factordeploy.compress.calibration import Calibration, CalibrationConfig

    return Calibration(minilm, CalibrationConfig(n=16, length=64, seed=0, batch_size=8))
