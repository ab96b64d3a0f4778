"""outdir.py: the --out marker, lock and atomic replacement; interrupts.py: signals as exceptions."""

from __future__ import annotations

import os
import signal

import pytest

from factordeploy.errors import UserError, disk_full
from factordeploy.interrupts import Interrupted, signals_as_exceptions
from factordeploy import outdir
from factordeploy.outdir import MARKER, OutLock, atomic_path, check_out, out_transaction


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_new_out_gets_marker_and_no_leftovers(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with out_transaction(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.tmp-")
        (tmp / "model.onnx").write_text("v1")
    assert _names(out) == sorted([MARKER, "model.onnx"])
    assert _names(out.parent) == ["out"]  # no lock, no temp folder


def test_deploy_folder_is_replaced_only_after_success(tmp_path):
    out = tmp_path / "out"
    with out_transaction(out) as tmp:
        (tmp / "old-only.txt").write_text("v1")
    with out_transaction(out) as tmp:
        (tmp / "model.onnx").write_text("v2")
        assert (out / "old-only.txt").read_text() == "v1"  # the old build is untouched while the new one runs
    assert _names(out) == sorted([MARKER, "model.onnx"]) and _names(tmp_path) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_both_swap_paths_replace_and_clean_up(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    else:
        a, b = tmp_path / "x", tmp_path / "y"
        a.mkdir()
        b.mkdir()
        (a / "f").write_text("a")
        if not outdir._exchange(a, b):
            pytest.skip("renameat2(RENAME_EXCHANGE) unsupported here")
        assert (b / "f").read_text() == "a" and not (a / "f").exists()  # swapped in one call
        a.rmdir()
        (b / "f").unlink()
        b.rmdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "old.txt").write_text("old")
    with out_transaction(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(out) == sorted([MARKER, "new.txt"])
    assert not [n for n in _names(tmp_path) if n.startswith(".out.")]


def test_failure_keeps_old_folder_and_removes_created_parents(tmp_path):
    out = tmp_path / "out"
    with out_transaction(out) as tmp:
        (tmp / "model.onnx").write_text("good")
    with pytest.raises(RuntimeError):
        with out_transaction(out) as tmp:
            (tmp / "model.onnx").write_text("half")
            raise RuntimeError("stage failed")
    assert (out / "model.onnx").read_text() == "good" and _names(tmp_path) == ["out"]
    with pytest.raises(KeyboardInterrupt):
        with out_transaction(tmp_path / "p" / "q" / "out"):
            raise KeyboardInterrupt
    assert _names(tmp_path) == ["out"]  # p/q were made for --out and are gone again


def test_user_folder_needs_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        with out_transaction(out):
            pass
    assert (out / "notes.txt").read_text() == "mine"
    with out_transaction(out, overwrite=True) as tmp:
        (tmp / "model.onnx").write_text("x")
    assert _names(out) == sorted([MARKER, "model.onnx"])


def test_empty_folder_is_fine_without_overwrite(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    with out_transaction(out) as tmp:
        (tmp / "m").write_text("x")
    assert (out / "m").exists()


def test_out_may_not_contain_inputs(tmp_path):
    model = tmp_path / "proj" / "model"
    model.mkdir(parents=True)
    with pytest.raises(UserError, match="contains the input"):
        check_out(tmp_path / "proj", overwrite=True, inputs=[model])
    check_out(tmp_path / "other", overwrite=True, inputs=[model])


def test_second_lock_fails_fast_and_names_the_holder(tmp_path):
    out = tmp_path / "out"
    first = OutLock(out).acquire()
    with pytest.raises(UserError, match=f"another deploy build \\(pid {os.getpid()}"):
        OutLock(out).acquire()
    first.release()
    assert _names(tmp_path) == []
    second = OutLock(out).acquire()
    assert not second.stale
    second.release()


def test_stale_lock_file_is_taken_over(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("pid 999999, started 00:00:00")  # its process is gone: no flock held
    (tmp_path / ".out.tmp-999999").mkdir()
    lock = OutLock(out).acquire()
    assert lock.stale
    lock.release()
    with out_transaction(out) as tmp:
        (tmp / "x").write_text("x")
    assert _names(tmp_path) == ["out"]


def test_recover_restores_folder_moved_aside_by_a_killed_swap(tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / ".out.old-4242"
    aside.mkdir()
    (aside / "model.onnx").write_text("previous")
    outdir._recover(out)
    assert (out / "model.onnx").read_text() == "previous" and _names(tmp_path) == ["out"]


def test_atomic_path_file_and_failure(tmp_path):
    target = tmp_path / "c" / "stf.pt"
    with atomic_path(target) as tmp:
        tmp.write_text("v1")
    assert target.read_text() == "v1"
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "v1" and _names(target.parent) == ["stf.pt"]


def test_signal_becomes_interrupted_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e:
        with signals_as_exceptions():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    assert e.value.name == "SIGTERM" and e.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_disk_full_is_found_through_wrapping_exceptions():
    try:
        try:
            raise OSError(28, "No space left on device", "/x/model.onnx")
        except OSError as inner:
            raise RuntimeError("protobuf write failed") from inner
    except RuntimeError as outer:
        err = disk_full(outer)
    assert err is not None and "no space left on device writing /x/model.onnx" in err.message
    assert disk_full(RuntimeError("[ONNXRuntimeError] : 1 : FAIL : No space left on device")) is not None
    assert disk_full(ValueError("bad value")) is None
