"""Every Makefile target and every `python -m indexcache_calib...` command the README and docs/*.md name,
run at smoke size: a broken import (many are inside functions, so only the path that runs them finds them) or a renamed
option fails here instead of in the middle of `make bench`.

Makefile targets are read from make's own dry run (`make -n TARGET`), so a new target is caught; each of its
project commands (`$(BIN)/indexcache SUB ...`, `$(BIN)/python -m indexcache_calib.X ...`) runs with the
recipe's own arguments plus the smoke arguments below (later options win), which swap in a tiny model and
shrink sizes. Every run happens in its own temporary directory holding tiny random models and small
`calibration_data/` files, so the commands' relative defaults (`outputs/...`, `calibration_data/...`) stay
there: nothing under the checkout's outputs/ or docs/ is touched."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import write_docs

ROOT = Path(__file__).resolve().parents[1]
MODEL, SOURCE = "tiny", "tiny-lite"  # directory names inside each run's workspace

# Targets with no project command to smoke-test, and why.
EXCLUDED = {
    "setup": "builds the virtualenv this test runs in",
    "test": "runs this suite itself",
    "clean": "only deletes outputs/",
}


@dataclass
class Smoke:
    extra: list[str]  # appended to the command's own arguments
    expect: str  # a glob, relative to the workspace, that must match a file after the run
    says: str  # some stdout line must contain this
    patch: dict = field(default_factory=dict)  # module constants that no option sizes: {name: smoke value}
    first: list[str] = field(default_factory=list)  # options of the module itself, given before its subcommand
    where: str = ""  # the module that holds the `patch` constants, where it is not the command's own


TRAIN = ["--seq-len", "32", "--batch-size", "1"]
BENCH_SEARCH = "indexcache_calib.evidence.bench_search"
ONE_THREAD = ["--threads", "1"]  # tiny matrices on a shared host: more threads only spin
SMOKE = {
    "indexcache calibrate": Smoke(["--model", MODEL, "--seq-len", "32", "--num-samples", "2", "--no-plots"],
                                  "outputs/*/layer_map.json", "layer_map.json"),
    # bench search and race take their sizes from constants (no option) of their study module, so those are shrunk.
    "indexcache_calib.evidence.bench search": Smoke([], f"outputs/bench/search_{MODEL}.json", f"| {MODEL} |",
                                           {"SEARCH_CASES": {MODEL: (2, 32)}}, where=BENCH_SEARCH),
    # 8 sequences: the race's first round (4) must leave something to race.
    "indexcache_calib.evidence.bench race": Smoke(["--model", MODEL, "--samples", "8", "--seq-len", "32"],
                                         f"outputs/bench/race_{MODEL}_8x32*.json", "within one paired SE at every ratio",
                                         {"SEARCH_CASES": {MODEL: (2, 32)}, "RACE_HELDOUT": 4}, where=BENCH_SEARCH),
    "indexcache_calib.evidence.bench project": Smoke([], "outputs/bench/project.json", "| layers |"),
    "indexcache_calib.evidence.bench indexer": Smoke(["--seq", "2048", "--heads", "2"], "outputs/bench/indexer.json", "| chunk |"),
    "indexcache_calib.evidence.bench parallel": Smoke(["--model", MODEL, "--seq-len", "32", "--samples", "2"],
                                             "outputs/bench/parallel.json", "search speedup"),
    "indexcache_calib.evidence.bench gpu": Smoke(["--smoke"], "outputs/bench/gpu.json", "| smoke |"),
    # Each `memory` cell is a fresh process; 512 tokens is the least that adds measurable memory (a cell
    # that adds none makes the report divide by zero).
    "indexcache_calib.evidence.bench_long memory": Smoke(["--lengths", "512", "--layers", "1"], "outputs/bench/long_memory*.json",
                                                "| tokens | forward dense", first=ONE_THREAD),
    "indexcache_calib.evidence.bench_long plan": Smoke(["--lengths", "8192"], "outputs/bench/long_plan*.json", "| tokens | mask per batch",
                                              first=ONE_THREAD),
    "indexcache_calib.evidence.bench_long lengths": Smoke(["--model", MODEL, "--short", "32", "--long", "64", "--draws", "2",
                                                           "--domains", "code", "--long-samples", "1", "--heldout-samples", "2"],
                                                          "outputs/bench/lengths.json", "| ratio | equal tokens | equal sequences |",
                                                          first=ONE_THREAD),
    "indexcache_calib.evidence.paper_table": Smoke(["--model", MODEL, "--seq-len", "32", "--num-samples", "2",
                                           "--heldout-samples", "2"], "outputs/paper_table/paper_table.md", "### 3."),
    "indexcache_calib.evidence.training_evidence": Smoke(
        ["--source", SOURCE, "--model", MODEL, *TRAIN, "--index-topk", "8", "--index-heads", "1", "--index-head-dim", "8",
         "--convert-steps", "2", "--distill-steps", "2", "--calibration-samples", "2", "--heldout-samples", "2"],
        "outputs/training_evidence/training_evidence.md", "## distill on"),
}


# ----------------------------------------------------------------------------- what the project names

def _clean_env() -> dict:
    # Nothing from the caller (ARGS=..., MODEL=..., or MAKEFLAGS when this runs under `make test`) may
    # change what the dry run prints.
    return {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}


@functools.cache
def _make(*args: str, check: bool = True) -> str:
    r = subprocess.run(["make", "--no-print-directory", "-f", "Makefile", *args], cwd=ROOT, env=_clean_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0 or not check, f"make {' '.join(args)} failed: {r.stderr}"
    return r.stdout


def makefile_targets() -> list[str]:
    """Every target make knows from the Makefile, expanded (recalibrate-code, ...); not the special
    targets (.PHONY), nor the setup stamp file (.venv/bin/.installed)."""
    db = _make("-pRrq", ":", check=False)  # print the database, run nothing (-q: exits 1)
    section = db.split("\n# Files\n", 1)[1].split("\n# Finished Make data base", 1)[0]
    targets, lines = [], section.splitlines()
    for prev, line in zip([""] + lines, lines):
        m = re.match(r"^([^\s#:=%][^:=]*?):(?!=)", line)
        if m and prev != "# Not a target:" and not m.group(1).startswith("."):
            targets.append(m.group(1))
    return sorted(set(targets))


def recipe(target: str) -> list[str]:
    """The commands `make TARGET` would run, variables expanded, without the setup bootstrap's."""
    setup = set(_make("-n", "-B", "setup").splitlines())
    return [line for line in _make("-n", target).splitlines() if line.strip() and line not in setup]


SHELL_OPS = {"|", "||", "&&", ";", ">", ">>", "2>", "<", "&"}


def parse_command(line: str) -> tuple[str, list[str]] | None:
    """(`indexcache SUB` or `indexcache_calib.X`, its arguments) for a project command line, else None."""
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    end = next((i for i, w in enumerate(words) if w in SHELL_OPS), len(words))
    words = words[:end]
    if not words:
        return None
    exe = Path(words[0]).name
    if exe == "indexcache" and len(words) > 1:
        return f"indexcache {words[1]}", words[2:]
    if re.fullmatch(r"python[\d.]*", exe) and words[1:2] == ["-m"] and len(words) > 2:
        module, argv = words[2], words[3:]
        if module == "indexcache_calib":  # the package's __main__ is the indexcache command line
            return (f"indexcache {argv[0]}", argv[1:]) if argv else None
        if module.startswith("indexcache_calib."):
            if argv and not argv[0].startswith("-") and f"{module} {argv[0]}" in SMOKE:
                return f"{module} {argv[0]}", argv[1:]
            if argv and re.fullmatch(r"[a-z][a-z0-9_-]*", argv[0]):  # a subcommand nothing here knows
                return f"{module} {argv[0]}", argv[1:]
            return module, argv
    return None


def manual_pages() -> list[Path]:
    """The user's manual: README.md and the pages under docs/ it links to."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_code(page: Path | None = None) -> list[str]:
    """The code in README.md and docs/*.md (or in one `page`): fenced blocks and inline spans."""
    found = []
    for path in [page] if page else manual_pages():
        text = path.read_text()
        blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
        rest = re.sub(r"```.*?```", "", text, flags=re.S)
        found += blocks + re.findall(r"`([^`\n]+)`", rest)
    return found


def readme_modules(page: Path | None = None) -> list[str]:
    """Each `python -m indexcache_calib.X [SUB]` the manual names (options dropped: they hold placeholders)."""
    found = set()
    for code in readme_code(page):
        for m in re.finditer(r"python[\d.]* -m (indexcache_calib[\w.]*)((?: [a-z][a-z0-9_-]*)?)", code):
            parsed = parse_command(f"python -m {m.group(1)}{m.group(2)}")
            if parsed:
                found.add(parsed[0])
    return sorted(found)


def readme_subcommands() -> list[str]:
    found = set()
    for code in readme_code():
        found.update(m.group(1) for m in re.finditer(r"(?:^|[\s(])indexcache ([a-z][a-z-]*)", code))
    return sorted(found)


def runs() -> list[tuple[str, str, tuple[str, ...]]]:
    """(where it is named, command, its own arguments), once per distinct command line."""
    seen: dict[tuple, list[str]] = {}
    for target in makefile_targets() if shutil.which("make") else []:
        if target in EXCLUDED:
            continue
        for line in recipe(target):
            parsed = parse_command(line)
            if parsed:
                seen.setdefault((parsed[0], tuple(parsed[1])), []).append(f"make {target}")
    for page in manual_pages():
        for key in readme_modules(page):
            seen.setdefault((key, ()), []).append(str(page.relative_to(ROOT)))
    return [(", ".join(where), key, argv) for (key, argv), where in seen.items()]


RUNS = runs()


# ----------------------------------------------------------------------------- every name has a smoke run

def test_the_makefile_and_readme_are_read():
    if not shutil.which("make"):
        pytest.skip("make is not installed: the Makefile cannot be read")
    targets = makefile_targets()
    assert {"demo", "bench", "paper-table", "training-evidence", "setup", "test", "clean"} <= set(targets), targets
    assert {f"recalibrate-{p.name.removesuffix('.jsonl')}" for p in (ROOT / "calibration_data").glob("*.jsonl")
            if not p.name.endswith(".heldout.jsonl")} <= set(targets)
    assert recipe("demo") and parse_command(recipe("demo")[0])[0] == "indexcache calibrate"
    assert {"indexcache_calib.evidence.bench search", "indexcache_calib.evidence.paper_table", "indexcache_calib.evidence.training_evidence"} \
        <= set(readme_modules())
    assert parse_command(".venv/bin/python -m indexcache_calib.evidence.bench race --seed 1 > x.txt") == \
        ("indexcache_calib.evidence.bench race", ["--seed", "1"])
    assert parse_command("rm -rf outputs/*/") is None


def test_every_makefile_target_is_smoke_tested():
    if not shutil.which("make"):
        pytest.skip("make is not installed: the Makefile cannot be read")
    problems = []
    for target in makefile_targets():
        if target in EXCLUDED:
            continue
        commands = [parse_command(line) for line in recipe(target)]
        if not any(commands):
            problems.append(f"{target}: runs no indexcache command ({recipe(target)})")
        problems += [f"{target}: {c[0]}" for c in commands if c and c[0] not in SMOKE]
    assert not problems, ("every Makefile target must be smoke-tested: add it to tests/test_commands.py "
                          "(SMOKE, or EXCLUDED with a reason): " + "; ".join(problems))


def test_every_readme_module_command_is_smoke_tested():
    missing = [key for key in readme_modules() if key not in SMOKE]
    assert not missing, f"README or docs/*.md name commands with no smoke run: add them to SMOKE in tests/test_commands.py: {missing}"


def test_every_named_module_runs_as_a_script():
    """`python -m X` runs X's main only under a __main__ guard (the smoke runs call main directly)."""
    named = readme_modules() + [key for _, key, _ in RUNS]
    for module in {key.split(" ")[0] for key in named if not key.startswith("indexcache ")}:
        path = ROOT / (module.replace(".", "/") + ".py")
        guards = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.If)
                  and ast.unparse(n.test) in ("__name__ == '__main__'", "'__main__' == __name__")]
        assert guards and "main(" in ast.unparse(guards[0]), f"{module} has no `if __name__ == '__main__': main()`"


def test_the_indexcache_script_is_the_command_line():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["indexcache"].partition(":")
    from indexcache_calib.cli import app

    assert callable(getattr(importlib.import_module(module), name))
    from typer.testing import CliRunner

    for sub in readme_subcommands():
        r = CliRunner().invoke(app, [sub, "--help"])
        assert r.exit_code == 0, f"README or docs/*.md name `indexcache {sub}`, which the command line does not have: {r.output}"


# ----------------------------------------------------------------------------- the smoke runs

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from test_distill import save_lite

    from indexcache_calib.testing import save_tiny

    base = tmp_path_factory.mktemp("models")
    return {MODEL: save_tiny(base / MODEL, "glm", layers=4), SOURCE: save_lite(base / SOURCE, layers=2)}


@pytest.fixture
def workspace(models, tmp_path, monkeypatch):
    """A directory with the tiny models and a small file for every calibration_data/*.jsonl, made the
    working directory; global settings the commands change (logging, threads) are put back after."""
    import torch
    import transformers

    for name, path in models.items():
        (tmp_path / name).symlink_to(path, target_is_directory=True)
    data = tmp_path / "calibration_data"
    data.mkdir()
    for i, p in enumerate(sorted((ROOT / "calibration_data").glob("*.jsonl"))):
        write_docs(data / p.name, n=12, seed=i)
    monkeypatch.chdir(tmp_path)
    for var in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(var, os.environ.get(var, "1" if var == "HF_HUB_OFFLINE" else "false"))
    verbosity, threads = transformers.utils.logging.get_verbosity(), torch.get_num_threads()
    accelerate = logging.getLogger("accelerate").level
    yield tmp_path
    transformers.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.enable_progress_bar()
    logging.getLogger("accelerate").setLevel(accelerate)
    torch.set_num_threads(threads)


# Benchmarks that measure per process (bench indexer, bench parallel, bench_long memory) start one Python
# per cell, and on a small shared host each start-up (torch and transformers imports) costs more than the
# cell. Here such a child is forked from a server that imported those once: still its own process, with its
# own memory peak, running the same command line through runpy as `python -m` would; only the imports are
# shared. Any other command runs as a real subprocess. (Address-space limits passed as preexec_fn are not
# applied: the smoke sizes stay far below them.)
CHILD = """
import os, runpy, sys
os.chdir(CWD)
os.environ.clear()
os.environ.update(ENV)
out, err = os.open(OUT, os.O_WRONLY | os.O_CREAT), os.open(ERR, os.O_WRONLY | os.O_CREAT)
os.dup2(out, 1)
os.dup2(err, 2)
sys.argv = ARGV
code = 0
try:
    runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
except BaseException:
    import traceback
    traceback.print_exc()
    code = 1
finally:
    sys.stdout.flush()
    sys.stderr.flush()
os._exit(code)
"""
PRELOAD = ["torch", "transformers", "transformers.modeling_utils", "indexcache_calib.model", "indexcache_calib.runner"]
_real_run = subprocess.run


def forked_run(cmd, *args, **kwargs):
    """subprocess.run for `python -m MODULE ...` and `torchrun ...`, in a child forked from the preloaded server."""
    cmd = [str(c) for c in cmd] if isinstance(cmd, (list, tuple)) else cmd
    if isinstance(cmd, list) and cmd[0] == sys.executable and cmd[1:2] == ["-m"] and len(cmd) > 2:
        module, argv = cmd[2], [cmd[2], *cmd[3:]]
    elif isinstance(cmd, list) and Path(cmd[0]).name == "torchrun":
        module, argv = "torch.distributed.run", cmd
    else:
        return _real_run(cmd, *args, **kwargs)
    import multiprocessing
    import tempfile

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="smoke-child-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        env = dict(kwargs.get("env") or os.environ)
        scope = {"CWD": str(kwargs.get("cwd") or os.getcwd()), "ENV": env, "OUT": str(out), "ERR": str(err),
                 "ARGV": argv, "MODULE": module}
        child = ctx.Process(target=exec, args=(CHILD, scope))
        child.start()
        child.join(kwargs.get("timeout"))
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))
        stdout, stderr = out.read_bytes(), err.read_bytes()
    if kwargs.get("text") or kwargs.get("universal_newlines") or kwargs.get("encoding"):
        stdout, stderr = stdout.decode(), stderr.decode()
    if not kwargs.get("capture_output") and kwargs.get("stdout") is None:
        sys.stdout.write(stdout if isinstance(stdout, str) else stdout.decode())
    result = subprocess.CompletedProcess(cmd, child.exitcode, stdout, stderr)
    if kwargs.get("check"):
        result.check_returncode()
    return result


def run_command(key: str, argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(subprocess, "run", forked_run)
    if key.startswith("indexcache "):
        from typer.testing import CliRunner

        from indexcache_calib.cli import app

        r = CliRunner().invoke(app, [key.split(" ", 1)[1], *argv])
        if r.exception and not isinstance(r.exception, SystemExit):
            raise r.exception
        return r.exit_code, r.stdout, r.stderr
    module_name, *sub = key.split(" ")
    module = importlib.import_module(module_name)
    holder = importlib.import_module(SMOKE[key].where) if SMOKE[key].where else module
    for name, value in SMOKE[key].patch.items():
        monkeypatch.setattr(holder, name, value)  # raises if the constant was renamed
    try:
        if inspect.signature(module.main).parameters:
            rc = module.main([*SMOKE[key].first, *sub, *argv])
        else:
            monkeypatch.setattr(sys, "argv", [f"{module_name}", *SMOKE[key].first, *sub, *argv])
            rc = module.main()
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc or 0, out.out, out.err


@pytest.mark.parametrize("where,key,argv", RUNS, ids=[f"{k}{''.join(' ' + a for a in v)}" for _, k, v in RUNS])
def test_command_runs_at_smoke_size(where, key, argv, workspace, capsys, monkeypatch):
    smoke = SMOKE.get(key)
    assert smoke is not None, f"{where}: `{key}` has no smoke run: add it to SMOKE in tests/test_commands.py"
    before = set(workspace.glob(smoke.expect))
    rc, out, err = run_command(key, [*argv, *smoke.extra], capsys, monkeypatch)
    assert rc == 0, f"{where}: `{key} {' '.join(argv)}` exited {rc}\n{err[-3000:]}"
    made = set(workspace.glob(smoke.expect)) - before
    assert made and all(p.stat().st_size > 0 for p in made), f"{where}: `{key}` wrote no {smoke.expect}\n{err[-2000:]}"
    assert smoke.says in out, f"{where}: `{key}` printed no line with {smoke.says!r}:\n{out[-2000:]}"
