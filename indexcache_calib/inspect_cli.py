"""`indexcache overlap` and `indexcache evaluate`: look at a model's indexers and compare patterns.
The work is in `diagnostics`; this module parses options and prints."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from indexcache_calib.cli_common import (
    AllowPickle, Attention, BatchSize, DeviceMap, Dtype, IndexerChunk, MaxMemory, Model, OffloadDir, Seed, TextField,
    TrustRemoteCode, _quiet_libraries, err, handled, out,
)
from indexcache_calib.errors import plural

# Commands import calibrate and diagnostics inside their functions, so that `--help` and argument errors do not
# load torch; diagnostics (which imports transformers) only after `_quiet_libraries` has set HF_HUB_OFFLINE.

DATA_HELP = "JSONL (text or messages), .txt, .parquet/.csv, or a saved datasets dir."
TOKENS_HELP = "A run's tokens.safetensors (or its run directory): score exactly those token ids instead of --data."


def overlap(
    model: Model = "tiny-dsa",
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    tokens: Optional[str] = typer.Option(None, "--tokens", help=TOKENS_HELP),
    out_dir: Optional[str] = typer.Option(None, "--out", "-o", help="Directory for overlap.csv and overlap.png (default: outputs/<model>_<data>_overlap)."),
    seq_len: int = typer.Option(512, help="Tokens per sequence; must exceed the model's index_topk (ignored with --tokens)."),
    num_samples: int = typer.Option(8, help="Sequences (ignored with --tokens)."),
    seed: Seed = 0,
    batch_size: BatchSize = 1,
    text_field: TextField = "text",
    indexer_chunk: IndexerChunk = None,
    attention: Attention = "auto",
    device_map: DeviceMap = "auto",
    dtype: Dtype = "auto",
    max_memory: MaxMemory = None,
    offload_dir: OffloadDir = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    as_json: bool = typer.Option(False, "--json", help="Print the matrix and its summary as JSON on stdout."),
) -> None:
    """Top-k overlap |T_i ∩ T_j| / k between every pair of layers' own indexers (a diagnostic, not an objective)."""
    from indexcache_calib.calibrate import Options

    opts = Options(
        model=model, data=data, out=out_dir, seq_len=seq_len, num_samples=num_samples, seed=seed,
        batch_size=batch_size, text_field=text_field, indexer_chunk=indexer_chunk, device_map=device_map,
        dtype=dtype, max_memory=max_memory, offload_dir=offload_dir, trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle, attention=attention,
    )
    with handled():
        _quiet_libraries()
        from indexcache_calib.diagnostics import overlap as run

        result = run(opts, _hooks(), tokens)
    if as_json:
        out.print(json.dumps(result, indent=2), markup=False)
        return
    n = len(result["layers"])
    if result["mean_adjacent"] is None:
        out.print(f"{plural(n, 'layer')}: fewer than two have an indexer, so there is nothing to compare", markup=False)
    else:
        a, b = result["min_pair"]
        out.print(f"mean adjacent-layer overlap: {result['mean_adjacent']:.3f}", markup=False)
        out.print(f"min overlap: {result['min']:.3f} (layers {a} and {b})", markup=False)
    missing = [i for i, row in enumerate(result["matrix"]) if row[i] is None]
    if missing:
        out.print(f"no indexer (NaN rows): layers {missing}", markup=False)
    out.print(f"matrix:  {result['files']['csv']}", markup=False)
    out.print(f"heatmap: {result['files']['png']}", markup=False)


def evaluate(
    model: Model = "tiny-dsa",
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP + " Use held-out data, not the calibration set."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help=TOKENS_HELP),
    uniform: str = typer.Option("2,4,8", help="Uniform interleaving baselines: 2,4,8 scores 1/2, 1/4 and 1/8 Full; 'none' for none."),
    layer_map: Optional[list[str]] = typer.Option(None, "--layer-map", "-l", help="A layer_map.json (or its run directory) to score; repeatable."),
    pattern: Optional[list[str]] = typer.Option(None, "--pattern", "-p", help="A pattern string (FSS…, one char per layer) to score; repeatable."),
    out_csv: Optional[str] = typer.Option(None, "--out", "-o", help="Also write the rows to this CSV file."),
    seq_len: int = typer.Option(512, help="Tokens per sequence; must exceed the model's index_topk (ignored with --tokens)."),
    num_samples: int = typer.Option(8, help="Sequences (ignored with --tokens)."),
    seed: Seed = 0,
    batch_size: BatchSize = 1,
    text_field: TextField = "text",
    overlap: bool = typer.Option(True, "--overlap/--no-overlap", help="Measure top-k overlap of shared layers (runs their own indexers)."),
    indexer_chunk: IndexerChunk = None,
    attention: Attention = "auto",
    device_map: DeviceMap = "auto",
    dtype: Dtype = "auto",
    max_memory: MaxMemory = None,
    offload_dir: OffloadDir = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    lengths: Optional[str] = typer.Option(None, "--lengths", help="Score at each of these lengths (e.g. 1K,4K,16K), "
                                          "--num-samples sequences of each from --data: the pattern's loss across lengths."),
    max_delta: float = typer.Option(0.01, "--max-delta", help="With --lengths: nats over all-Full a pattern may cost; "
                                    "below the length where it costs more, a minimum length for sharing is recommended."),
    record: bool = typer.Option(False, "--record", help="With --lengths: write the curve into the one --layer-map "
                                "(`show` prints it, `export` carries its minimum length)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="With --lengths: draw loss over all-Full against length to this PNG."),
    retrieval: Optional[str] = typer.Option(None, "--retrieval", help="Score retrieval probes instead of LM loss: "
                                            "kinds needle, multikey, copy (comma list) or all, built from --data as the "
                                            "haystack, --num-samples of each kind at each of --lengths (default --seq-len)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON on stdout (with --lengths: rows and curves)."),
) -> None:
    """Score all-F, uniform interleaving, layer maps and patterns on the same tokens, with one model load."""
    from indexcache_calib.calibrate import Options
    from indexcache_calib.errors import CalibError

    opts = Options(
        model=model, data=data, seq_len=seq_len, num_samples=num_samples, seed=seed, batch_size=batch_size,
        text_field=text_field, overlap=overlap, indexer_chunk=indexer_chunk, device_map=device_map, dtype=dtype,
        max_memory=max_memory, offload_dir=offload_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        attention=attention,
    )
    with handled():
        from indexcache_calib import length_curve as lc

        spans = lc.parse_lengths(lengths) if lengths is not None else None
        if retrieval is not None:
            return _evaluate_retrieval(opts, retrieval, spans, tokens, uniform, layer_map or [], pattern or [], out_csv,
                                       record, plot, as_json, model)
        lc.check_max_delta(max_delta)
        if spans is None and (record or plot):
            raise CalibError(f"{'--record' if record else '--plot'} draws the loss across lengths: give --lengths too")
        if record and len(layer_map or []) != 1:
            raise CalibError("--record writes the curve into one layer map: give exactly one --layer-map")
        if plot and not plot.endswith(".png"):
            raise CalibError(f"--plot {plot} must name a .png file")
        _quiet_libraries()
        from indexcache_calib.diagnostics import evaluate as run, record_curve

        rows = run(opts, _hooks(), tokens, uniform, layer_map or [], pattern or [], out_csv, spans)
        curves = {}
        if spans is not None:
            data_meta = {"data": data, "seed": seed, "num_samples": num_samples, "max_delta": max_delta}
            names = dict.fromkeys(r["name"] for r in rows if r["kind"] in ("layer map", "pattern"))
            curves = {name: lc.curve(rows, name, max_delta, data_meta) for name in names}
            if plot:
                lc.plot(rows, plot, f"{model} on {data}")
            if record:
                written = record_curve(layer_map[0], curves[next(iter(names))])
    if as_json:
        out.print(json.dumps(rows if spans is None else {"rows": rows, "curves": curves}, indent=2), markup=False)
        return
    table = Table(title=f"{model} on {data or tokens}", title_justify="left")
    columns = ("name", "F", "loss", "delta vs all-F", "perplexity", "mean overlap")
    if spans is not None:
        columns = ("tokens",) + columns[:4] + ("paired SE",) + columns[5:]
    for col in columns:
        table.add_column(col, justify="left" if col == "name" else "right")
    for r in rows:
        cells = [
            r["name"], str(r["num_full"]), f"{r['loss']:.5f}", f"{r['delta']:+.5f}",
            "-" if r["perplexity"] is None else f"{r['perplexity']:.3f}",
            "-" if r["mean_overlap"] is None else f"{r['mean_overlap']:.3f}",
        ]
        if spans is not None:
            cells = [f"{r['seq_len']:,}"] + cells[:4] + ["-" if r["paired_se"] is None else f"{r['paired_se']:.5f}"] + cells[5:]
        table.add_row(*cells)
    out.print(table)
    # Plain lines, never wrapped or cut, so patterns can be copied.
    for r in rows:
        if spans is None or r["seq_len"] == spans[0]:
            out.print(f"{r['name']}: {r['pattern']}", markup=False)
    for name, c in curves.items():
        rec = c["recommendation"]
        out.print(f"{name}: {rec['text']}" + (f" (recommended minimum length {rec['min_seq_len']:,})" if rec["min_seq_len"] else ""), markup=False)
    if out_csv:
        out.print(f"rows: {out_csv}", markup=False)
    if plot:
        out.print(f"plot: {plot}", markup=False)
    if record:
        out.print(f"length curve recorded in {written}", markup=False)


def _evaluate_retrieval(opts, kinds: str, spans, tokens, uniform, layer_map, pattern, out_csv, record: bool,
                        plot, as_json: bool, model: str) -> None:
    from indexcache_calib.errors import CalibError
    from indexcache_calib.probes import parse_kinds

    names = parse_kinds(kinds)
    if tokens is not None:
        raise CalibError("--retrieval builds its probes from --data (the haystack); --tokens holds a run's own tokens",
                         hint="pass --data (held-out documents) with --retrieval")
    if opts.data is None:
        raise CalibError("--retrieval builds its probes from --data: give the documents to use as the haystack")
    if plot:
        raise CalibError("--plot draws the loss across lengths; with --retrieval the rows are the result (--json, --out)")
    if record and len(layer_map) != 1:
        raise CalibError("--record writes the retrieval result into one layer map: give exactly one --layer-map")
    _quiet_libraries()
    from indexcache_calib.data import file_sha256
    from indexcache_calib.diagnostics import evaluate_retrieval, record_retrieval
    from indexcache_calib.retrieval import record as retrieval_record

    rows = evaluate_retrieval(opts, _hooks(), ",".join(names), spans, uniform, layer_map, pattern, out_csv)
    written = None
    if record:
        name = next(r["name"] for r in rows if r["kind"] == "layer map")
        meta = {"data": opts.data, "data_sha256": file_sha256(opts.data), "seed": opts.seed,
                "num_samples": opts.num_samples, "kinds": names, "lengths": sorted({r["seq_len"] for r in rows})}
        written = record_retrieval(layer_map[0], retrieval_record(rows, name, meta))
    if as_json:
        out.print(json.dumps(rows, indent=2), markup=False)
        return
    table = Table(title=f"{model} on {opts.data}: retrieval probes", title_justify="left")
    for col in ("name", "F", "tokens", "probe", "exact match", "vs all-F (SE)", "answer loss", "delta (SE)", "EM by depth"):
        table.add_column(col, justify="left" if col in ("name", "probe") else "right")
    for r in rows:
        em_d = "" if r["exact_match_delta"] is None else f"{r['exact_match_delta']:+.2f}" + (
            "" if r["exact_match_se"] is None else f" ({r['exact_match_se']:.2f})")
        loss_d = "" if r["delta"] is None else f"{r['delta']:+.3f}" + ("" if r["paired_se"] is None else f" ({r['paired_se']:.3f})")
        depth = " ".join(f"{b['exact_match']:.2f}" for b in r["by_depth"])
        table.add_row(r["name"], str(r["num_full"]), f"{r['seq_len']:,}", r["probe"], f"{r['exact_match']:.2f}", em_d,
                      f"{r['answer_loss']:.3f}", loss_d, depth)
    out.print(table)
    out.print("EM by depth: exact match of the probes whose answer sits in each quarter of the haystack, first to last", markup=False)
    for r in rows:
        if r["seq_len"] == rows[0]["seq_len"] and r["probe"] == rows[0]["probe"]:
            out.print(f"{r['name']}: {r['pattern']}", markup=False)
    if out_csv:
        out.print(f"rows: {out_csv}", markup=False)
    if written:
        out.print(f"retrieval recorded in {written}", markup=False)


def _hooks():
    from indexcache_calib.calibrate import Hooks

    return Hooks(message=lambda t: err.print(t, markup=False), warn=lambda t: err.print(f"Warning: {t}", markup=False))


def register(app) -> None:
    app.command()(overlap)
    app.command()(evaluate)
