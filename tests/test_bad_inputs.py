"""The bad-input corpus (issue 12): every case exits with code 2 and exactly one stderr line naming the
problem and a fix, never a traceback, and leaves the file system as it was (no --out, no temporary
folder or lock, the user's files intact). Plus faults: SIGINT/SIGTERM during compression and export
(subprocesses), a full disk (injected, and a real small tmpfs where the OS permits one), a build
killed with SIGKILL, and two builds to one --out.

Tiny random models and early failures keep the file cheap; only the fault tests start subprocesses.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from factordeploy.cli import main
from factordeploy.outdir import MARKER, OutLock

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-eval", "--no-baseline", "--backend", "ort", "--quiet"]


# ---------------------------------------------------------------- helpers


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under `roots` (hidden ones too) with size and content hash."""
    import hashlib

    snap = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            key = str(p)
            if p.is_symlink():
                snap[key] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[key] = ("dir",)
            else:
                snap[key] = ("file", p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
    return snap


def expect_one_line_error(args: list[str], expect: str, roots: list[Path]) -> str:
    before = snapshot(*roots)
    r = CliRunner().invoke(main, ["build", *args], catch_exceptions=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: ") and ". Fix: " in line and line.split(". Fix: ", 1)[1].strip(), line
    assert expect in line, line
    assert "Traceback" not in r.output and r.stdout == ""
    assert snapshot(*roots) == before
    return line


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_weights(folder: Path, fn: Callable[[dict], None]) -> None:
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


QUERY0 = "encoder.layer.0.attention.self.query.weight"


def _key(sd: dict, suffix: str) -> str:
    return next(k for k in sd if k.endswith(suffix))


def _nan(sd):
    sd[_key(sd, QUERY0)][3, 5] = float("nan")


def _inf(sd):
    sd[_key(sd, "encoder.layer.1.output.dense.weight")][0, 0] = float("inf")


def _drop(sd):
    del sd[_key(sd, QUERY0)]


def _reshape(sd):
    sd[_key(sd, QUERY0)] = torch.zeros(32, 64)


def _config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


class Evil:
    """A pickle payload: unpickling would call os.system (the safe loader must refuse it)."""

    def __reduce__(self):
        return (os.system, ("echo unpickled-and-ran-code",))


# ---------------------------------------------------------------- the corpus
# Each case: (tmp, fixtures) -> (args without --out, expected text). --out is tmp/"out" unless args set it.

def _model_case(edit: Callable[[Path], None]):
    def make(tmp: Path, fx: dict) -> list[str]:
        m = copy_model(fx["bert"], tmp / "model")
        edit(m)
        return ["--model", str(m)]
    return make


def _truncate(m: Path) -> None:
    b = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(b[: len(b) // 2])


def _garbage_header(m: Path) -> None:
    b = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(b[:8] + b"\x00" * 64 + b[72:])


def _pickle_bin(m: Path) -> None:
    (m / "model.safetensors").unlink()
    torch.save({"embeddings.word_embeddings.weight": Evil()}, m / "pytorch_model.bin")


def _garbage_bin(m: Path) -> None:
    (m / "model.safetensors").unlink()
    (m / "pytorch_model.bin").write_bytes(b"this is not a checkpoint" * 100)


def _sharded_missing(m: Path) -> None:
    (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


def _no_tokenizer(m: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (m / f).unlink(missing_ok=True)


def _broken_tokenizer(m: Path) -> None:
    (m / "tokenizer.json").write_text("{not json")


def _config_only(m: Path) -> None:
    (m / "model.safetensors").unlink()


def _arch_only(model_type: str, **extra):
    def make(tmp: Path, fx: dict) -> list[str]:
        m = tmp / "model"
        m.mkdir()
        (m / "config.json").write_text(json.dumps({"model_type": model_type, **extra}))
        return ["--model", str(m)]
    return make


def _t5_config(tmp: Path, fx: dict) -> list[str]:
    from transformers import T5Config

    m = tmp / "model"
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=100).save_pretrained(m)
    return ["--model", str(m)]


def _vit_config(tmp: Path, fx: dict) -> list[str]:
    from transformers import ViTConfig

    m = tmp / "model"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(m)
    return ["--model", str(m)]


def _calib_file(name: str, data: bytes | str, *extra: str):
    def make(tmp: Path, fx: dict) -> list[str]:
        f = tmp / name
        f.write_bytes(data if isinstance(data, bytes) else data.encode())
        return ["--model", str(fx["bert"]), "--method", "svd-whiten", "--calib-data", str(f), *extra]
    return make


def _random_bytes() -> bytes:
    import random

    return random.Random(0).randbytes(20_000)


def _stf_file(content: Callable[[Path], None]):
    def make(tmp: Path, fx: dict) -> list[str]:
        d = tmp / "ckpt"
        d.mkdir()
        content(d / "trainer.pt")
        return ["--model", str(fx["bert"]), "--method", "dsformer", "--stf-checkpoint", str(d)]
    return make


def _user_out(tmp: Path, fx: dict) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("years of work")
    return ["--model", str(fx["bert"])]


def _symlink_out(tmp: Path, fx: dict) -> list[str]:
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real")
    return ["--model", str(fx["bert"]), "--out", str(tmp / "link")]


def _out_holds_model(tmp: Path, fx: dict) -> list[str]:
    m = copy_model(fx["bert"], tmp / "proj" / "model")
    (tmp / "proj" / MARKER).write_text("{}")  # even a deploy-written folder may not swallow an input
    return ["--model", str(m), "--out", str(tmp / "proj")]


def _out_holds_checkpoint(tmp: Path, fx: dict) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / MARKER).write_text("{}")
    return ["--model", str(fx["bert"]), "--method", "dsformer", "--stf-checkpoint", str(tmp / "out" / "ckpt")]


def _out_is_cwd(tmp: Path, fx: dict) -> list[str]:
    return ["--model", str(fx["bert"]), "--out", str(Path.cwd()), "--overwrite"]


def _out_file(tmp: Path, fx: dict) -> list[str]:
    (tmp / "f").write_text("x")
    return ["--out", str(tmp / "f")]


def _out_below_file(tmp: Path, fx: dict) -> list[str]:
    (tmp / "f").write_text("x")
    return ["--out", str(tmp / "f" / "sub" / "o")]


def _model_is_file(tmp: Path, fx: dict) -> list[str]:
    shutil.copy(fx["bert"] / "model.safetensors", tmp / "model.safetensors")
    return ["--model", str(tmp / "model.safetensors")]


def _empty_folder(tmp: Path, fx: dict) -> list[str]:
    (tmp / "m").mkdir()
    return ["--model", str(tmp / "m")]


def _flags(*args: str, model: bool = True):
    return lambda tmp, fx: (["--model", str(fx["bert"])] if model else []) + list(args)


def _stf_is_file(tmp: Path, fx: dict) -> list[str]:
    (tmp / "ck").write_text("x")
    return ["--method", "dsformer", "--stf-checkpoint", str(tmp / "ck")]


def _tokenizer_too_big(m: Path) -> None:
    _config(m, vocab_size=1000)


CASES: dict[str, tuple[Callable[[Path, dict], list[str]], str]] = {
    # cases that already gave one line before issue 12
    "unknown-model": (_flags("--model", "no-such-model", model=False), "unknown model 'no-such-model'"),
    "unknown-method": (_flags("--method", "nope"), "unknown method 'nope'"),
    "missing-model-folder": (lambda t, fx: ["--model", str(t / "missing" / "model")], "model folder not found"),
    "folder-without-config": (_empty_folder, "is not a Hugging Face model folder"),
    "ratio-0": (_flags("--ratio", "0"), "--ratio must be between 0 and 1"),
    "ratio-1.5": (_flags("--ratio", "1.5"), "--ratio must be between 0 and 1"),
    "ratio-negative": (_flags("--ratio", "-0.2"), "--ratio must be between 0 and 1"),
    "ratio-nan": (_flags("--ratio", "nan"), "--ratio must be between 0 and 1"),
    "calib-0": (_flags("--calib", "0"), "--calib must be >= 1"),
    "calib-data-missing": (lambda t, fx: ["--calib-data", str(t / "none.txt")], "--calib-data file not found"),
    "calib-data-empty": (_calib_file("empty.txt", b"\n \n"), "--calib-data file is empty"),
    "targets-match-nothing": (_flags("--targets", "embeddings*"), "has no nn.Linear layers"),
    "out-below-a-file": (_out_below_file, "is not writable"),
    "out-is-a-file": (_out_file, "exists and is not a folder"),
    "unknown-device": (_flags("--device", "tpu"), "unknown device 'tpu'"),
    "option-of-another-method": (_flags("--method", "svd", "--stf-steps", "3"), "do not apply to method 'svd'"),
    "bad-trt-batch-range": (_flags("--batch", "8:1:32"), "--batch"),
    "precision-with-ort": (_flags("--precision", "fp16"), "--precision/--sparse-weights apply to TensorRT"),
    # the table
    "out-holds-user-files": (_user_out, "already holds 1 file(s) that deploy did not write (e.g. thesis.tex)"),
    "model-config-only": (_model_case(_config_only), "has config.json but no weights"),
    "model-truncated-safetensors": (_model_case(_truncate), "model.safetensors is truncated"),
    "model-nan-weight": (_model_case(lambda m: edit_weights(m, _nan)),
                         f"weight {QUERY0} in "),
    "model-pickle-non-tensor": (_model_case(_pickle_bin), "refused by the safe loader"),
    "calib-data-random-bytes": (_calib_file("random.txt", _random_bytes()), "is not UTF-8 text"),
    "stf-checkpoint-pickle-payload": (_stf_file(lambda p: torch.save({"x": Evil()}, p)), "is not a loadable checkpoint"),
    # new cases
    "model-inf-weight": (_model_case(lambda m: edit_weights(m, _inf)), "0 NaN and 1 Inf values"),
    "model-corrupt-safetensors-header": (_model_case(_garbage_header), "is corrupt"),
    "model-missing-shard": (_model_case(_sharded_missing), "lists 1 shard(s) that are not in the folder"),
    "model-missing-tensor": (_model_case(lambda m: edit_weights(m, _drop)), "would be filled with random values"),
    "model-shape-mismatch": (_model_case(lambda m: edit_weights(m, _reshape)), "do not match its config.json"),
    "model-garbage-pickle": (_model_case(_garbage_bin), "pickle checkpoint"),
    "model-invalid-config-json": (_model_case(lambda m: (m / "config.json").write_text("{oops")), "is not valid JSON"),
    "model-unknown-architecture": (_arch_only("frobnicator"), "unsupported architecture 'frobnicator'"),
    "model-encoder-decoder": (_t5_config, "unsupported architecture 't5'"),
    "model-vision": (_vit_config, "not a text model"),
    "model-is-a-file": (_model_is_file, "is a file"),
    "tokenizer-missing": (_model_case(_no_tokenizer), "maps ordinary text to unknown tokens"),
    "tokenizer-broken": (_model_case(_broken_tokenizer), "tokenizer in"),
    "tokenizer-larger-than-embedding": (_model_case(_tokenizer_too_big), "but the model's embedding has 1,000 rows"),
    "calib-data-gzip": (_calib_file("text.txt.gz", b"\x1f\x8b\x08\x00" + bytes(200)), "gzip-compressed"),
    "calib-data-nul-bytes": (_calib_file("nul.txt", "words " + "\x00" * 500), "control characters"),
    "calib-data-latin1": (_calib_file("latin1.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50),
                          "is not UTF-8 text"),
    "calib-data-jsonl-no-field": (_calib_file("d.jsonl", '{"body": "some words"}\n'), "has no 'text' field (fields: body)"),
    "calib-data-jsonl-bad-line": (_calib_file("d.jsonl", '{"text": "ok"}\n{"text": \n'), "line 2 is not JSON"),
    "calib-data-jsonl-not-string": (_calib_file("d.jsonl", '{"text": 5}\n'), "'text' is a JSON int"),
    "calib-data-too-few-tokens": (_calib_file("short.txt", "A short note about bridges and rivers.\n"),
                                  "the requested windows need"),
    "calib-data-is-folder": (lambda t, fx: (t / "dir").mkdir() or ["--calib-data", str(t / "dir")], "is not a file"),
    "stf-checkpoint-is-a-file": (_stf_is_file, "is a file, not a folder"),
    "stf-checkpoint-garbage": (_stf_file(lambda p: p.write_bytes(b"garbage" * 10)), "is not a loadable checkpoint"),
    "out-is-symlink": (_symlink_out, "is a symbolic link"),
    "out-contains-model": (_out_holds_model, "contains the input"),
    "out-is-current-folder": (_out_is_cwd, "contains the current folder"),
    "out-contains-checkpoint-to-write": (_out_holds_checkpoint, "contains the input"),
}


@pytest.fixture(scope="module")
def fx(tiny_bert_dir) -> dict:
    return {"bert": tiny_bert_dir}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, fx, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "keep.txt").write_text("a user's file in the current folder")
    monkeypatch.chdir(work)
    make, expect = CASES[case]
    args = make(tmp_path, fx)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    expect_one_line_error(args + FAST, expect, [tmp_path, fx["bert"]])


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


def test_out_locked_by_another_build(fx, tmp_path):
    out = tmp_path / "out"
    lock = OutLock(out).acquire()
    try:
        line = expect_one_line_error(["--model", str(fx["bert"]), "--out", str(out), *FAST],
                                     "is being written by another deploy build", [tmp_path])
        assert f"pid {os.getpid()}" in line
    finally:
        lock.release()
    assert list(tmp_path.iterdir()) == []


def _served_folder(tmp: Path, fx: dict, onnx_bytes: bytes | None) -> Path:
    """A folder `deploy generate` reads: tokenizer files plus a model.onnx (garbage, or with external data)."""
    d = tmp / "served"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fx["bert"] / f, d / f)
    if onnx_bytes is not None:
        (d / "model.onnx").write_bytes(onnx_bytes)
    return d


def _onnx_with_external_data(location: str) -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    w.external_data.add(key="location", value=location)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


@pytest.mark.parametrize("content,expect", [
    (b"not an onnx model at all", "is not a readable ONNX model"),
    (_onnx_with_external_data("../../../etc/passwd"), "keeps tensor 'W' in ../../../etc/passwd, outside the folder"),
    (_onnx_with_external_data("/etc/passwd"), "keeps tensor 'W' in the absolute path /etc/passwd"),
], ids=["garbage-onnx", "external-data-escapes", "external-data-absolute"])
def test_generate_refuses_a_broken_or_escaping_folder(fx, tmp_path, content, expect):
    """Commands that read a built folder (here `deploy generate`) refuse it in one line too."""
    d = _served_folder(tmp_path, fx, content)
    before = snapshot(tmp_path)
    r = CliRunner().invoke(main, ["generate", str(d), "--prompt", "Hello"], catch_exceptions=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and expect in lines[0] and ". Fix: " in lines[0], r.output
    assert "Traceback" not in r.output and snapshot(tmp_path) == before


def test_disk_full_injected_during_export(fx, tmp_path, monkeypatch):
    """The export writes half its file, then the disk is full: one line, the previous build intact, nothing left.

    (The real export filling a real small disk is test_real_full_disk_on_a_small_tmpfs.)"""
    import factordeploy.stages as stages

    def full_disk(loaded, model, path, *a, **k):
        Path(path).write_bytes(b"\x08" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(stages, "export_onnx", full_disk)
    prev = tmp_path / "out"
    prev.mkdir()
    (prev / MARKER).write_text("{}")
    (prev / "model.onnx").write_text("the previous build")
    line = expect_one_line_error(["--model", str(fx["bert"]), "--out", str(prev), *FAST],
                                 "no space left on device writing", [tmp_path])
    assert "exported.onnx" in line
    assert (prev / "model.onnx").read_text() == "the previous build"


# ---------------------------------------------------------------- faults in a real process


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _leftovers(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


def _run_until(cmd: list[str], marker: str, sig: int, timeout: float = 240.0) -> tuple[int, str]:
    """Start `cmd`, send `sig` once `marker` appears on its stderr, return (exit code, stderr)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    err = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            if not line:
                break
            err.append(line)
            if marker in line:
                time.sleep(0.5)
                p.send_signal(sig)
                break
        rest_out, rest_err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, "".join(err) + rest_err


def _previous_build(out: Path) -> dict:
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "model.onnx").write_text("the previous build")
    return snapshot(out)


def test_sigint_during_compression_keeps_previous_out(fx, tmp_path):
    out = tmp_path / "out"
    before = _previous_build(out)
    cmd = [sys.executable, "-m", "factordeploy.cli", "build", "--model", str(fx["bert"]), "--method", "dsformer",
           "--stf-steps", "1000000", "--calib", "4", "--calib-len", "32", "--out", str(out),
           "--no-eval", "--no-baseline", "--backend", "ort"]
    rc, err = _run_until(cmd, "compress (dsformer) ...", signal.SIGINT)
    assert rc == 128 + signal.SIGINT, err
    assert "compress (dsformer) done" not in err  # the signal landed during compression
    assert err.strip().splitlines()[-1].startswith("error: interrupted by SIGINT"), err
    assert "Traceback" not in err
    assert snapshot(out) == before and _leftovers(tmp_path, out) == []


def test_sigterm_during_export_leaves_nothing(fx, tmp_path):
    """Export is held open after writing exported.onnx (the file exists in the temp folder) until SIGTERM."""
    out = tmp_path / "new" / "out"
    hold = ("import sys, time; import factordeploy.export.onnx_export as m; real = m.validate_onnx\n"
            "def slow(p):\n    r = real(p); print('EXPORT-WRITTEN', file=sys.stderr, flush=True); time.sleep(600); return r\n"
            "m.validate_onnx = slow\nfrom factordeploy.cli import main\nmain()")
    cmd = [sys.executable, "-c", hold, "build", "--model", str(fx["bert"]), "--out", str(out),
           "--no-eval", "--no-baseline", "--backend", "ort"]
    rc, err = _run_until(cmd, "EXPORT-WRITTEN", signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted by SIGTERM"), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # not even the parent folder it created for --out


def test_killed_build_leaves_stale_lock_that_the_next_build_takes_over(tmp_path):
    """SIGKILL cannot be caught: the next build to that --out finds the dead build's lock and temp folder."""
    out = tmp_path / "out"
    script = ("import os, sys, time; from pathlib import Path; from factordeploy.outdir import out_transaction\n"
              f"with out_transaction({str(out)!r}) as tmp:\n"
              "    (tmp / 'half.onnx').write_text('x'); print('HOLDING', file=sys.stderr, flush=True); time.sleep(600)\n")
    rc, err = _run_until([sys.executable, "-c", script], "HOLDING", signal.SIGKILL, timeout=60)
    assert rc == -signal.SIGKILL
    left = _leftovers(tmp_path, out)
    assert f".{out.name}.lock" in left and any(n.startswith(f".{out.name}.tmp-") for n in left)

    from factordeploy.outdir import out_transaction

    with out_transaction(out) as tmp:
        (tmp / "model.onnx").write_text("new")
    assert (out / "model.onnx").read_text() == "new" and (out / MARKER).is_file()
    assert _leftovers(tmp_path, out) == []


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespaces / tmpfs mounts on this machine")
def test_real_full_disk_on_a_small_tmpfs(fx, tmp_path):
    """--out on a 3 MB tmpfs (its own mount namespace): the 8 MB export fills it; one line, tmpfs left empty."""
    disk = tmp_path / "disk"
    disk.mkdir()
    build = (f"{sys.executable} -m factordeploy.cli build --model {fx['bert']} --out {disk}/out "
             "--no-eval --no-baseline --backend ort --quiet")
    script = f"mount -t tmpfs -o size=3m tmpfs {disk} && {{ {build}; rc=$?; ls -A {disk}; exit $rc; }}"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=_env(), cwd=REPO,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device"), r.stderr
    assert r.stdout.strip() == ""  # `ls -A` of the tmpfs after the build: nothing left
