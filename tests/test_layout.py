"""The package's layout is its architecture, and imports run one way through it:

    indexcache_calib/            the calibration tool: CLI, pipeline, search, runner, attention, families, ...
    indexcache_calib/training/   `indexcache dsa-convert` and `distill`: uses the tool
    indexcache_calib/evidence/   the benchmarks and evidence scripts: use training and the tool
    indexcache_calib/recipes/    building calibration_data/ and the embedded models: use training and the tool

Read from the source with `ast`, every import counted, including those inside functions (a deferred import
is still a dependency: it only moves when the module is loaded)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "indexcache_calib"
LAYERS = ("training", "evidence", "recipes")  # subpackages; every other module is the tool

# What each layer may import besides itself.
MAY_USE = {
    "tool": set(),
    "training": {"tool"},
    "evidence": {"tool", "training"},
    "recipes": {"tool", "training"},
}
# The one import against the direction: the `indexcache` command line is a single program, so cli.py
# registers the training commands (their option parsing; train_cli imports the training code inside them).
EXCEPTIONS = {("indexcache_calib.cli", "indexcache_calib.training.train_cli")}
# Import circles known and left in place, each edge with its reason. The family table (families.py) names
# DeepSeek-V4's stand-ins from compressed.py and MiniMax-M3's from blocks.py, which build on attention.py and
# sharing.py, which read the table: the imports are deferred, so loading families loads neither (nor the
# library's DeepSeek-V4 modeling file).
KNOWN_CIRCLES = {("indexcache_calib.families", "indexcache_calib.compressed"),
                 ("indexcache_calib.families", "indexcache_calib.blocks")}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `path` imports, wherever in the file (`from pkg import mod` names mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("indexcache_calib"))
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the project imports by absolute name"
            if node.module and node.module.startswith("indexcache_calib"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in known else node.module)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "tool"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_the_layers_exist():
    names = modules()
    for sub in LAYERS:
        assert f"indexcache_calib.{sub}" in names, f"indexcache_calib/{sub}/ has no __init__.py"
    assert layer("indexcache_calib.training.warmup") == "training"
    assert layer("indexcache_calib.evidence.bench") == "evidence"
    assert layer("indexcache_calib.runner") == layer("indexcache_calib") == "tool"


def test_imports_run_one_way():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            here, there = layer(module), layer(target)
            if there != here and there not in MAY_USE[here] and (module, target) not in EXCEPTIONS:
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "imports must run evidence -> training -> tool:\n  " + "\n  ".join(sorted(wrong))


def test_the_exceptions_are_still_needed():
    g = graph()
    stale = [f"{a} -> {b}" for a, b in EXCEPTIONS | KNOWN_CIRCLES if b not in g.get(a, set())]
    assert not stale, f"listed in tests/test_layout.py but no longer imported: {stale}"


def find_circles(g: dict[str, set[str]]) -> list[str]:
    """Each import circle a depth-first walk meets, as `a -> b -> a`."""
    circles, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(g.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(g):
        if module not in state:
            visit(module)
    return circles


def test_no_import_circle():
    circles = find_circles({m: {t for t in ts if (m, t) not in KNOWN_CIRCLES} for m, ts in graph().items()})
    assert not circles, "import circles:\n  " + "\n  ".join(circles)


def test_the_checks_see_a_circle_and_a_wrong_way_import(tmp_path):
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert find_circles({"a": {"b"}, "b": set()}) == []
    (tmp_path / "a.py").write_text("def f():\n    from indexcache_calib.training import t\n")
    known = {"indexcache_calib.a": tmp_path / "a.py", "indexcache_calib.training.t": tmp_path / "t.py"}
    assert imports(known["indexcache_calib.a"], known) == {"indexcache_calib.training.t"}
    assert layer("indexcache_calib.training.t") not in MAY_USE[layer("indexcache_calib.a")]
