"""`indexcache export | validate | apply | show`: handing a layer map to the serving engines.
The logic is in deploy.py; this file parses options and draws."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from indexcache_calib import cli_common as _common
from indexcache_calib.errors import CalibError, plural

# Commands import deploy and artifact (which import torch) inside their functions, so that `--help` and
# argument errors do not load torch.

F_STYLE, S_STYLE = "bold white on green4", "black on grey70"
UNDECIDED_STYLE = "yellow"


def _print(text: str) -> None:
    _common.out.print(text, markup=False, emoji=False)


def _note(text: str) -> None:
    _common.err.print(f"Note: {text}", markup=False, emoji=False)


def _refuse(problems: list[str], hint: str) -> None:
    from indexcache_calib.deploy import EXIT_INVALID

    err = _common.err
    for p in problems:
        err.print(f"Error: {p}", markup=False, emoji=False)
    err.print(f"Hint: {hint}", markup=False, emoji=False)
    raise typer.Exit(EXIT_INVALID)


def _load_layer_map(arg: str):
    """`deploy.load_layer_map`, saying what an interrupted run directory holds instead of "does not exist"."""
    from indexcache_calib import deploy

    _refuse_unfinished(arg)
    return deploy.load_layer_map(arg)


def _refuse_unfinished(arg: str) -> None:
    from indexcache_calib import artifact as art

    path = Path(arg).expanduser()
    if path.is_dir() and not (path / art.LAYER_MAP).exists() and (path / art.CHECKPOINT).is_file():
        try:
            steps = plural(len(json.loads((path / art.CHECKPOINT).read_text())["steps"]), "search step")
        except (OSError, ValueError, KeyError, TypeError):
            steps = "its search steps"
        raise CalibError(
            f"{path} holds an unfinished calibration run ({steps} in {art.CHECKPOINT}), not a layer map yet",
            hint=f"finish it: rerun its calibrate command with --resume (and --out {shlex.quote(str(path))}); meanwhile "
                 f"indexcache evaluate --tokens {shlex.quote(str(path))} scores patterns on its tokens")


def export(
    layer_map: str = typer.Argument(..., help="layer_map.json, or the run directory holding it."),
    engine: str = typer.Option(..., "--engine", "-e", help="vllm, sglang, transformers or trtllm."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name or path the engine loads (default: the calibrated model)."),
    out_file: Optional[str] = typer.Option(None, "--out", "-o", help="Write to this file instead of stdout."),
    as_json: bool = typer.Option(False, "--json", help="Print the overrides, model and command as JSON."),
) -> None:
    """Print the launch arguments that make an engine use the pattern."""
    from indexcache_calib import artifact as art
    from indexcache_calib import deploy

    with _common.handled():
        lm, _ = _load_layer_map(layer_map)
        result = deploy.export(lm, engine.lower(), model)
        for n in result["notes"]:
            _note(n)
        text = json.dumps(result, indent=2, sort_keys=True) if as_json else result["text"]
        if out_file is None:
            _print(text)
            return
        path = Path(out_file).expanduser()
        try:
            art.atomic_write(path, text + "\n")
        except OSError as e:
            raise CalibError(f"cannot write {path}: {e.strerror or e}")
        _print(f"wrote {engine} launch arguments to {path}")


def validate(
    target: str = typer.Argument(..., help="layer_map.json, a run directory, or a bare pattern such as FSSFSS..."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint dir, hub id (local cache) or alias to check against."),
    as_json: bool = typer.Option(False, "--json", help="Print {valid, problems, notes} as JSON."),
) -> None:
    """Check a pattern: F/S only, the first indexer layer full, one char per indexer layer, S wherever the
    checkpoint has no indexer weights, a pattern the family's library runs, a layer map that agrees with
    itself and with the model it is checked against."""
    from indexcache_calib import deploy

    with _common.handled():
        _refuse_unfinished(target)
        t = deploy.read_target(target)
        info = deploy.read_model(model) if model else None
        report = deploy.validate(t, info)
        if as_json:
            _print(json.dumps(report.as_json(), indent=2, sort_keys=True))
        elif report.valid:
            against = f" for {model}" if model else ""
            _print(f"OK: {report.pattern} ({report.pattern.count('F')} of {plural(len(report.pattern), 'layer')} full) is valid{against}")
        if not as_json and report.valid:
            for n in report.notes:
                _note(n)
        if not report.valid:
            _refuse(report.problems, "a pattern has one 'F'/'S' per indexer layer, starts with 'F', and is 'S' where the checkpoint has no indexer weights")


def apply(
    layer_map: str = typer.Argument(..., help="layer_map.json, or the run directory holding it."),
    model: str = typer.Option(..., "--model", "-m", help="The checkpoint directory (or cached hub id) to apply the pattern to."),
    out_dir: str = typer.Option(..., "--out", "-o", help="New model directory: config.json with the pattern, every other file linked."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists and is not empty."),
) -> None:
    """Write a model directory whose config.json carries the pattern, so engines need no overrides."""
    from indexcache_calib import deploy

    with _common.handled():
        lm, _ = _load_layer_map(layer_map)
        info = deploy.read_model(model)
        try:
            done = deploy.apply(lm, info, Path(out_dir), overwrite)
        except deploy.InvalidPattern as e:
            _refuse(e.problems, f"the layer map does not fit {model}; check with: indexcache validate {shlex.quote(layer_map)} --model {shlex.quote(model)}")
        for n in done.notes:
            _note(n)
        if done.link_error:
            made = ", ".join(plural(v, k.replace("hardlink", "hard link")) for k, v in done.linked.items() if v)
            _note(f"symlinks are not possible here ({done.link_error}); made {made} instead")
        family = info.checkpoint.family
        if done.transformers_ignores:
            _note(f"transformers has no indexer sharing for {info.architecture} and ignores these keys there")
        pattern = lm["pattern"]
        count = sum(done.linked.values())
        _print(f"wrote {done.out}: config.json sets index_topk_pattern and indexer_types "
               f"({pattern.count('F')} of {plural(len(pattern), 'indexer layer')} full); {plural(count, 'other entry', 'other entries')} linked from {done.source}")
        q = shlex.quote(str(done.out))
        serve = {"vllm": f"vllm serve {q}", "sglang": f"python -m sglang.launch_server --model-path {q}"}
        lines = [serve[e] for e in ("vllm", "sglang") if e in family.engines]
        if lines:
            _print(f"serve it without overrides: {'  |  '.join(lines)}")
        else:
            _note(deploy.consumers_note(family))


def show(
    layer_map: str = typer.Argument(..., help="layer_map.json, or the run directory holding it."),
    as_json: bool = typer.Option(False, "--json", help="Print the same data as JSON."),
) -> None:
    """Draw a layer map: the pattern, each layer's source and overlap, the search path, the provenance."""
    from indexcache_calib import deploy

    with _common.handled():
        lm, path = _load_layer_map(layer_map)
        try:
            data = deploy.summary(lm, path)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CalibError(f"{path} is malformed ({type(e).__name__}: {e})", hint="calibrate again to rewrite it")
    if as_json:
        _print(json.dumps(data, indent=2, sort_keys=True))
        return
    _draw(data)


def _draw(data: dict) -> None:
    from indexcache_calib.deploy import UNDECIDED, margin_note

    out = _common.out
    pattern, n = data["pattern"], len(data["pattern"])
    every_layer = data["positions"] == list(range(n))
    of = plural(n, "layer") if every_layer else f"{plural(n, 'indexer layer')} ({plural(data['num_layers'], 'decoder layer')})"
    out.print(Text(f"{data['layer_map'] or 'layer map'}: {data['num_full']} of {of} full", style="bold"))
    if not every_layer:
        out.print(Text(f"one character per indexer layer: layers {data['positions']}"))
    ruler = [" "] * (n + 4)
    for i in range(0, n, 10):
        ruler[i : i + len(str(i))] = str(i)
    out.print(Text("layer " if every_layer else "index ") + Text("".join(ruler).rstrip()))
    strip = Text("      ")
    for c in pattern:
        strip.append(c, style=F_STYLE if c == "F" else S_STYLE)
    out.print(strip)
    legend = Text("      ")
    legend.append("F", style=F_STYLE).append(" full: runs its own indexer   ").append("S", style=S_STYLE).append(" shared: reuses the nearest F above")
    out.print(legend)
    loss = data["loss"]
    objective = data.get("objective") or {"name": "lm"}
    if objective["name"] != "lm":
        from indexcache_calib.objective import describe as describe_objective

        out.print(Text(f"objective {describe_objective(objective)}"))
    out.print(Text(f"loss {loss['final']:.5f}, all-F {loss['all_full']:.5f}, delta {loss['final'] - loss['all_full']:+.5f}"))
    search = data.get("search") or {}
    if search.get("strategy"):
        out.print(Text(f"search {search['strategy']}" + (f"; tolerance {search['tolerance']}" if search.get("tolerance") else "")))

    table = Table(title="layers", title_justify="left")
    for col in ("layer", "F/S", "reads top-k from", "overlap"):
        table.add_column(col, justify="right" if col in ("layer", "overlap") else "left")
    for row in data["layers"]:
        kind = "F" if row["type"] == "F" else "S" + (" (no indexer weights)" if row["no_indexer_weights"] else "")
        source = "own indexer" if row["type"] == "F" else f"layer {row['reads_from']}"
        overlap = "" if row["overlap"] is None else f"{row['overlap']:.4f}"
        table.add_row(str(row["layer"]), Text(kind, style=F_STYLE if row["type"] == "F" else S_STYLE), source, overlap)
    out.print(table)

    steps = Table(title="loss along the search (delta vs all-F)", title_justify="left")
    for col in ("step", "layer -> S", "full", "loss", "delta", "note"):
        steps.add_column(col, justify="left" if col in ("step", "note") else "right")
    for s in data["path"]:
        notes = ["this layer map"] if s["pattern"] == pattern else []
        if not s["decided"]:
            notes.append(f"undecided: {margin_note(s, short=True)}")
        steps.add_row(str(s["step"]), ",".join(map(str, s["flipped"])), str(s["num_full"]), f"{s['loss']:.5f}",
                      f"{s['delta']:+.5f}", Text("; ".join(notes), style="" if s["decided"] else UNDECIDED_STYLE))
    for u in data["uniform"]:
        searched = u["searched_loss_same_num_full"]
        note = "" if searched is None else f"searched {searched - u['loss']:+.5f}"
        steps.add_row(f"uniform {u['ratio']}", "", str(u["num_full"]), f"{u['loss']:.5f}", f"{u['delta']:+.5f}", note)
    out.print(steps)
    if data["undecided_steps"]:
        out.print(Text(f"{len(data['undecided_steps'])} of {plural(len(data['path']) - 1, 'step')} {UNDECIDED} "
                       "(each beat its runner-up by less than 2 paired standard errors)", style=UNDECIDED_STYLE))

    curve = data.get("length_curve")
    if curve:
        lengths = Table(title=f"length curve (indexcache evaluate --lengths on {curve.get('data')}, "
                              f"{curve.get('num_samples')} sequences per length)", title_justify="left")
        for col in ("tokens", "all-F loss", "delta", "paired SE", "mean overlap", "uniform"):
            lengths.add_column(col, justify="right")
        for p in curve["points"]:
            uniform = ", ".join(f"{k} {v:+.5f}" for k, v in sorted(p.get("uniform", {}).items()))
            lengths.add_row(f"{p['seq_len']:,}", f"{p['all_full_loss']:.5f}", f"{p['delta']:+.5f}",
                            "-" if p["paired_se"] is None else f"{p['paired_se']:.5f}",
                            "-" if p["mean_overlap"] is None else f"{p['mean_overlap']:.3f}", uniform)
        out.print(lengths)
        out.print(Text(f"length curve: {curve['recommendation']['text']}"))

    if data.get("retrieval"):
        from indexcache_calib.retrieval import lines as retrieval_lines

        for line in retrieval_lines(data["retrieval"]):
            out.print(Text(line))

    prov = Table(title="provenance", title_justify="left", show_header=False)
    prov.add_column("key")
    prov.add_column("value", overflow="fold")  # hashes and paths are copied, not read
    for key, value in sorted(data["provenance"].items()):
        if isinstance(value, dict):
            value = ", ".join(f"{k or 'all'} {v}" for k, v in sorted(value.items()))
        prov.add_row(key, Text(str(value)))
    out.print(prov)


def register(app) -> None:
    app.command("export")(export)
    app.command("validate")(validate)
    app.command("apply")(apply)
    app.command("show")(show)
