"""Generated bad-input cases (issue 23): every command and option of `deploy`, walked from click's own
metadata, tried with values outside its declared range (factordeploy/ranges.py types, method options'
MethodOption specs, config.MODEL_LIMITS and MethodOption.limit for the bounds that depend on the model).

Each case must exit with code 2, print exactly one stderr line (`error: ... Fix: ...`) that names the
option, no traceback, nothing on stdout, and leave the file system as it was (the test's folders, the
model folder and the repository: the commands run with a scratch folder as the current directory).
Values tried: 0 and -1 where outside the range, the first integer past each end, integers beyond 64 bits,
NaN, +-inf, non-numbers, the empty string, and for paths: missing, a file where a folder is expected (and
the reverse), a path under a file, and special file systems (/proc, /sys) where nothing can be created.
Model-dependent limits are tried just past the bound on a tiny BERT (max positions 256, widths 64/128,
2 blocks), so the builds fail right after config.json is read. No case reaches real work.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from factordeploy.cli import main
from factordeploy.compress.base import all_methods
from factordeploy.config import MODEL_LIMITS
from factordeploy.models.shape import ModelShape
from factordeploy.ranges import Float, FloatList, InPath, Int, OutPath, Text, Triple

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-eval", "--no-baseline", "--backend", "ort", "--quiet"]
HUGE = 2**70  # beyond int64: must be refused by the range, never handed to torch/numpy
LONG = "n" * 300  # one path component past NAME_MAX (ENAMETOOLONG if it reached the OS)
DEEP = "/".join(["d" * 200] * 25)  # past PATH_MAX

# placeholders resolved per test (they need the test's folders)
MISSING, FILE, DIR, UNDER_FILE, PROC, SYS, DEVNULL = ("<missing>", "<file>", "<dir>", "<under-file>", "<proc>",
                                                      "<sys>", "<devnull>")


# ---------------------------------------------------------------- the walk over click's metadata


def commands(group: click.Group = main, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            out += commands(cmd, path + (name,))
        else:
            out.append((path + (name,), cmd))
    return out


def checked_params(cmd: click.Command) -> list[click.Parameter]:
    """Every option/argument a user can give a value to (flags and --help/--version have none)."""
    opts = [p for p in cmd.params if isinstance(p, click.Option) and not p.is_flag and not p.count and not p.hidden]
    return opts + [p for p in cmd.params if isinstance(p, click.Argument)]


RNG = random.Random(23)  # seeded draws beyond each bound (hypothesis is not a dependency of this project)


def drawn_beyond(lo: float | None, hi: float | None, integer: bool, n: int = 3) -> list[object]:
    out: list[object] = []
    for _ in range(n):
        span = 10 ** RNG.randint(0, 25)
        if lo is not None:
            out.append(lo - (RNG.randint(1, span) if integer else RNG.uniform(1e-6, span)))
        if hi is not None:
            out.append(hi + (RNG.randint(1, span) if integer else RNG.uniform(1e-6, span)))
    return out


def bad_values(t: click.ParamType) -> list[object]:
    """Values outside the type's range, from the type's own metadata (plus seeded draws beyond each bound)."""
    if isinstance(t, Int):
        vals: list[object] = [HUGE, -HUGE, str(HUGE * 1000), "nan", "", "1.5", "ten"]
        vals += [v for v in (0, -1) if not t.ok(v)]
        if t.min is not None:
            vals.append(t.min - 1)
        if t.max is not None:
            vals.append(t.max + 1)
        lo = t.min if t.min is not None else 0
        if t.multiple_of or t.power_of_two or t.one_of:  # the first in-bounds value that breaks the rule
            vals.append(next(v for v in range(lo, lo + 10_000) if not t.ok(v)))
        return vals + drawn_beyond(t.min, t.max, True)
    if isinstance(t, Float):
        vals = ["nan", "NaN", "inf", "-inf", "1e400", "", "abc"]
        if t.min is not None:
            vals.append(t.min - 1.0)
            if t.min_open:
                vals.append(t.min)
        if t.max is not None:
            vals.append(t.max + 1.0)
            if t.max_open:
                vals.append(t.max)
        return vals + drawn_beyond(t.min, t.max, False)
    if isinstance(t, Triple):
        return ["", "1:2", "1:2:3:4", "a:b:c", f"{t.lo - 1}:{t.lo}:{t.lo}", "8:1:32", "1:8:4", f"1:8:{t.hi + 1}",
                f"1:8:{HUGE}", "nan:1:2", "1.5:2:3"]
    if isinstance(t, FloatList):
        return ["", ",", "0.5,", "nan", "0.5,inf", "x", *(str(v) for v in bad_values(t.item) if v != "")]
    if isinstance(t, OutPath):
        return ["", "   ", FILE, UNDER_FILE, DEVNULL, PROC, SYS, LONG, DEEP]
    if isinstance(t, InPath):
        vals = ["", "   ", MISSING, PROC + "/no-such-entry", LONG, DEEP]
        vals += {"dir": [FILE, DEVNULL], "file": [DIR, DEVNULL]}.get(t.kind, [])
        return vals
    if isinstance(t, Text):
        return ["", "   "] + (["no/such thing", "../up", "-x", "x" * 300] if t.pattern else [])
    if isinstance(t, click.Choice):
        return ["", "no-such-choice", "NaN"]
    raise AssertionError(f"{t!r} is not a ranges.py type or a click.Choice: its range is not declared")


def method_for(option_name: str) -> str | None:
    """The first method that declares `--option_name` (method options are only accepted with it)."""
    for name, cls in all_methods().items():
        if any(o.key == option_name for o in cls.options):
            return name
    return None


CASES = [(path, p.name) for path, cmd in commands() for p in checked_params(cmd)]


# ---------------------------------------------------------------- running one case


def snapshot(*roots: Path) -> dict[str, tuple]:
    snap = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_symlink():
                snap[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[str(p)] = ("dir",)
            else:
                snap[str(p)] = ("file", p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
    return snap


def repo_entries() -> set[str]:
    return {p.name for p in REPO.iterdir()}


@pytest.fixture()
def world(tmp_path, tiny_bert_dir, monkeypatch):
    """The test's folders: a scratch cwd, a file, a folder, a fake build folder (config.json only)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (tmp_path / "a-file.txt").write_text("not a folder\n")
    (tmp_path / "a-dir").mkdir()
    build = tmp_path / "build"
    build.mkdir()
    (build / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    monkeypatch.chdir(cwd)
    return {"tmp": tmp_path, "model": tiny_bert_dir, "build": build}


def resolve(value: object, w: dict) -> str:
    tmp = w["tmp"]
    table = {MISSING: tmp / "no-such-thing", FILE: tmp / "a-file.txt", DIR: tmp / "a-dir",
             UNDER_FILE: tmp / "a-file.txt" / "sub", PROC: "/proc/factordeploy-test", SYS: "/sys/factordeploy-test",
             DEVNULL: "/dev/null"}
    s = str(value)
    for k, v in table.items():
        s = s.replace(k, str(v))
    return s


def base_args(path: tuple[str, ...], w: dict) -> list[str]:
    """A valid command line for `path` (the case's option is appended, so it overrides these)."""
    tmp, model, build = w["tmp"], str(w["model"]), str(w["build"])
    return {
        ("build",): ["build", "--model", model, "--out", str(tmp / "out"), *FAST],
        ("generate",): ["generate", build, "--prompt", "Once upon a time"],
        ("inspect",): ["inspect", build],
        ("verify",): ["verify", build, "--quiet"],
        ("export-triton",): ["export-triton", build],
        ("sweep",): ["sweep", "--model", model, "--out", str(tmp / "sweep"), "--methods", "svd", "--ratios", "0.5",
                     "--quiet"],
        ("pretrain",): ["pretrain", "--params", "tiny", "--out", str(tmp / "pretrained"), "--quiet"],
    }.get(path, list(path))


def with_value(args: list[str], cmd: click.Command, param: click.Parameter, value: str) -> list[str]:
    if isinstance(param, click.Argument):  # the positional argument comes right after the command name
        return [args[0], value, *args[2:]]
    flag = max((o for o in param.opts if o.startswith("--")), key=len)
    args = list(args)
    if flag in args:  # replace the base value
        i = args.index(flag)
        del args[i:i + 2]
    extra = []
    if args[0] == "build":  # a method's option is only taken with that method
        m = method_for(param.name)
        if m is not None:
            extra = ["--method", m]
    return [*args, *extra, f"{flag}={value}" if value.startswith("-") else flag, *([] if value.startswith("-") else [value])]


def expect_one_line(args: list[str], w: dict, names: list[str]) -> str:
    roots = [w["tmp"], w["model"]]
    before, before_repo = snapshot(*roots), repo_entries()
    r = CliRunner().invoke(main, args, catch_exceptions=True)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    what = f"deploy {' '.join(args)}\nexit {r.exit_code}\nstderr:\n{r.stderr}\nexception: {r.exception!r}"
    assert r.exit_code == 2, what
    assert len(lines) == 1, what
    line = lines[0]
    assert line.startswith("error: ") and ". Fix: " in line and line.split(". Fix: ", 1)[1].strip(), what
    assert "Traceback" not in r.output and r.stdout == "", what
    assert any(n in line for n in names), f"the line does not name {names}: {what}"
    assert snapshot(*roots) == before, what
    assert repo_entries() == before_repo, f"files appeared in the repository: {repo_entries() - before_repo}"
    return line


# ---------------------------------------------------------------- the generated cases


def test_every_option_is_range_typed():
    """No option is left with a bare click type (its range would live nowhere)."""
    untyped = [(" ".join(path), p.name, type(p.type).__name__) for path, cmd in commands() for p in checked_params(cmd)
               if not isinstance(p.type, (Int, Float, Text, click.Choice))]
    assert not untyped, untyped
    assert len(CASES) > 80  # every command is walked: build, generate, pretrain, inspect, verify, export-triton, sweep


@pytest.mark.parametrize("path,name", CASES, ids=[f"{' '.join(p)}:{n}" for p, n in CASES])
def test_out_of_range_values(path, name, world):
    cmd = main
    for part in path:
        cmd = cmd.commands[part]
    param = next(p for p in cmd.params if p.name == name)
    names = [o for o in getattr(param, "opts", []) if o.startswith("--")] or [name.upper()]
    if isinstance(param, click.Argument):
        names += [name.upper(), "folder"]  # the FOLDER argument's errors name it or the folder
    for value in bad_values(param.type):
        v = resolve(value, world)
        if isinstance(param, click.Argument) or isinstance(param.type, (InPath, OutPath)):
            names_v = names + [v.strip() or "''"] if v.strip() else names
        else:
            names_v = names
        expect_one_line(with_value(base_args(path, world), cmd, param, v), world, names_v)


def tiny_shape(model_dir: Path) -> ModelShape:
    from transformers import AutoConfig

    return ModelShape.from_config(AutoConfig.from_pretrained(str(model_dir)), model_dir.name, "encoder")


# context a limit needs to be reached at all (the option only acts with it)
LIMIT_CONTEXT = {"--attention-block": ["--attention", "combiner-fixed"], "--share-blocks": ["--share", "group"]}


def test_just_past_each_model_limit(world):
    """config.MODEL_LIMITS and every MethodOption.limit, at bound + 1 on the tiny BERT: refused after
    config.json is read and before any weight is loaded."""
    shape = tiny_shape(world["model"])
    base = base_args(("build",), world)
    cases = []
    for flag, (limit, _) in MODEL_LIMITS.items():
        hi = limit.bound(shape)
        assert hi is not None, flag
        value = f"1:8:{hi + 1}" if flag == "--seq" else str(hi + 1)
        cases.append([flag, value, *LIMIT_CONTEXT.get(flag, [])])
    for mname, cls in all_methods().items():
        for o in cls.options:
            if o.limit is not None:
                cases.append(["--method", mname, f"--{o.name}", str(o.limit.bound(shape) + 1),
                              *LIMIT_CONTEXT.get(f"--{o.name}", [])])
    assert len(cases) >= 6
    for extra in cases:
        flag = next(a for a in extra if a.startswith("--") and a != "--method")
        line = expect_one_line([*base, *extra], world, [flag])
        assert "exceeds" in line or "larger than" in line, line


def test_past_the_model_limit_on_generate_and_sweep(world):
    # --max-new-tokens reaching the folder's position table (config.json: 64 positions)
    expect_one_line(["generate", str(world["build"]), "--prompt", "x", "--max-new-tokens", "64"], world,
                    ["--max-new-tokens"])
    # sweep: the cells' --calib-len past the model's 256 positions, before --out is created
    expect_one_line([*base_args(("sweep",), world), "--calib-len", "257"], world, ["--calib-len"])


@pytest.mark.parametrize("step,errno_", [("lock", 13), ("recover", 30), ("tmp", 30), ("marker", 5), ("swap", 18),
                                         ("parents", 13)])
def test_every_os_error_of_the_out_transaction_is_one_named_line(step, errno_, tmp_path, monkeypatch):
    """Lock, leftovers of a dead build, temporary sibling, marker, swap, parent folders: an OSError at any of
    them is a UserError naming --out, the path and a fix, and nothing is left behind."""
    from factordeploy import outdir
    from factordeploy.errors import UserError

    def boom(*a, **k):
        raise OSError(errno_, os.strerror(errno_))

    out = tmp_path / "parent" / "out"
    if step != "parents":
        out.parent.mkdir()
    target = {"lock": (outdir.OutLock, "acquire"), "recover": (outdir, "_recover"), "marker": (outdir, "write_marker"),
              "swap": (outdir, "_swap_in"), "parents": (Path, "mkdir")}.get(step)
    if step == "tmp":
        real = Path.mkdir
        monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: boom() if ".tmp-" in self.name else real(self, *a, **k))
    else:
        monkeypatch.setattr(*target, boom)
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as e:
        with outdir.out_transaction(out):
            pass
    msg = e.value.message
    assert "\n" not in msg and f"--out {out}" in msg and ". Fix: " in msg and os.strerror(errno_) in msg, msg
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


def test_group_level_usage_errors(world):
    expect_one_line(["no-such-command"], world, ["no-such-command"])
    expect_one_line(["--no-such-option"], world, ["--no-such-option"])
    expect_one_line(["build", "--no-such-option", "1"], world, ["--no-such-option"])
    expect_one_line(["generate", str(world["build"])], world, ["--prompt"])  # a required option missing
    expect_one_line(["inspect"], world, ["FOLDER"])  # a required argument missing
