"""Build folders load in Hugging Face Optimum and compute what the build computed.

Runs scripts/check_optimum.py, whose Optimum side needs a separate venv (optimum-onnx pins
transformers 4.57): `bash scripts/setup_optimum.sh` makes `.venv-optimum`, which scripts/setup.sh
also tries (so CI runs this); without it the tests skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import check_optimum  # noqa: E402

pytestmark = pytest.mark.skipif(check_optimum.optimum_python() is None,
                                reason="no venv with optimum-onnx (bash scripts/setup_optimum.sh)")


def _build(model_dir: Path, out: Path) -> Path:
    from factordeploy.build import BuildConfig, run_build

    run_build(BuildConfig(model=str(model_dir), method="svd", ratio=0.5, out=str(out), baseline=False,
                          evaluate=False, backend="ort", latency_points=((1, 16),), latency_runs=3))
    return out


def _check(folder: Path, *extra: str) -> tuple[int, list[dict], str]:
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_optimum.py"), str(folder), *extra],
                       capture_output=True, text=True, cwd=ROOT)
    return p.returncode, [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")], p.stderr


@pytest.fixture(scope="module")
def rope_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose RoPE base is not transformers 4.57's fallback (10000)."""
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("rope_llama"), rope_theta=500.0)


def test_encoder_folder_loads_in_optimum(tiny_bert_dir, tmp_path):
    rc, out, err = _check(_build(tiny_bert_dir, tmp_path / "bert"))
    assert rc == 0, err
    opt = out[-1]
    assert opt["class"] == "ORTModelForFeatureExtraction" and opt["transformers"].startswith("4.")
    assert opt["checks"]["token_ids_identical"]["passed"] and opt["checks"]["outputs"]["max_abs"] <= 1e-4


def test_decoder_folder_loads_and_generates_in_optimum(rope_llama_dir, tmp_path):
    folder = _build(rope_llama_dir, tmp_path / "llama")
    rc, out, err = _check(folder, "--speed-tokens", "8", "--threads", "1")
    assert rc == 0, err
    c = out[-1]["checks"]
    speed = out[-1]["speed"]  # Optimum's own generate(), timed; the tiny prompt is the whole wiki text, cut at 128
    assert speed["new_tokens"] == 8 and speed["threads"] == 1 and 0 < speed["prompt_tokens"] <= 128
    assert speed["tokens_per_s"] == pytest.approx(8 / speed["seconds"], rel=0.01)
    assert out[-1]["class"] == "ORTModelForCausalLM"
    assert c["rope_theta"] == {"read": 500.0, "expected": 500.0, "passed": True}
    assert c["greedy_generate_identical"]["passed"] and c["outputs"]["passed"]

    # without the flat key transformers 4.57 silently uses rope_theta 10000: the check must catch it
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["rope_theta"]
    (folder / "config.json").write_text(json.dumps(cfg))
    rc, out, _ = _check(folder)
    assert rc == 1 and out[-1]["checks"]["rope_theta"]["read"] == 10000.0
