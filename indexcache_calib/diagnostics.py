"""Diagnostics on a loaded model: how much the layers' own indexers agree (the top-k overlap matrix),
and the loss of any set of patterns scored side by side on the same tokens.

Overlap is only a diagnostic: the search optimises loss, and choosing layers by overlap does no better
than uniform interleaving (paper, Appendix C). It shows where indexers agree, not which layers to keep.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from indexcache_calib import artifact as art
from indexcache_calib import model as mdl
from indexcache_calib.calibrate import (OOM_HINT, Hooks, Options, Prepared, all_full_pattern, check_options, check_seq_len,
                                        load_tokenizer, make_runner, prepare)
from indexcache_calib.data import pack, read_documents, tokens_sha256
from indexcache_calib.errors import EXIT_OUT_OF_MEMORY, CalibError, is_out_of_memory, plural
from indexcache_calib.pattern import FULL, UNIFORM_EVERY, check_pattern, uniform_pattern
from indexcache_calib.plots import OVERLAP_PLOT, overlap_plot
from indexcache_calib.sharing import install_sharing, sharing_state
from indexcache_calib.stats import mean_se

OVERLAP_CSV = "overlap.csv"


@contextmanager
def _memory_errors():
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise CalibError("out of memory", hint=OOM_HINT, exit_code=EXIT_OUT_OF_MEMORY) from None


def read_tokens(path: str | Path) -> tuple[torch.Tensor, Path]:
    """Token ids saved by a calibration run; `path` may be the run directory. Returns (ids, file)."""
    path = Path(path)
    if path.is_dir():
        path = path / art.TOKENS
    if not path.is_file():
        if (path.parent / art.CHECKPOINT).is_file():
            raise CalibError(f"token file {path} does not exist: the run in {path.parent} stopped before saving its tokens",
                             hint="finish it: rerun its calibrate command with --resume; the tokens are saved before its next step")
        raise CalibError(f"token file {path} does not exist", hint=f"pass the {art.TOKENS} of a calibration run, or its directory")
    try:
        ids = art.load_tokens(path)
    except KeyError:
        raise CalibError(f"{path} holds no 'input_ids' tensor") from None
    except Exception as e:  # safetensors raises its own error types for files it cannot parse
        raise CalibError(f"cannot read token file {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if ids.dim() != 2 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise CalibError(f"{path}: 'input_ids' must be a non-empty 2-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    return ids.long(), path


def load_inputs(opts: Options, hooks: Hooks, tokens: str | None, check_config=None, before_loading=None,
                ids: torch.Tensor | None = None) -> tuple[Prepared, Options]:
    """`prepare` on --data, on the exact token ids of a run (--tokens), or on `ids` made from --data (probes);
    with the options the tokens imply (their file, length and count), as a new object."""
    if (opts.data is None) == (tokens is None):
        raise CalibError("give exactly one of --data and --tokens")
    check_options(opts)
    weights = None
    if tokens is not None:
        ids, path = read_tokens(tokens)
        # A run calibrated on key tokens or probe answers saved their weights beside the ids: its losses are those.
        weights = art.load_token_weights(path)
        if weights is not None:
            hooks.message(f"{path} carries its run's token weights: losses are over the tokens that run scored")
        opts = replace(opts, data=str(path), seq_len=ids.shape[1], num_samples=ids.shape[0])

    def check(ckpt):
        vocab = ckpt.text.vocab_size
        if ids is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise CalibError(
                f"{opts.data}: token ids run from {int(ids.min())} to {int(ids.max())}, outside the model's vocabulary of {vocab}",
                hint="these tokens were made with another tokenizer; pass the model they were calibrated on",
            )
        if check_config is not None:
            check_config(ckpt)

    prep = prepare(opts, hooks, ids=ids, check_config=check, before_loading=before_loading)
    prep.weights = weights
    return prep, opts


def data_label(data: str) -> str:
    # For a run's tokens file the run directory names the data better than "tokens".
    path = Path(data)
    return str(path.parent) if path.name == art.TOKENS else data


# -- overlap ---------------------------------------------------------------------------------------


@torch.no_grad()
def overlap_matrix(model, layout, ids: torch.Tensor, batch_size: int = 1, chunk: int | None = None) -> np.ndarray:
    """P×P mean |T_i ∩ T_j| / |T_i| of the pattern positions' own selections, on the unmodified (all-F)
    forward, over query positions that see more than k keys. Positions without indexer weights get NaN
    rows and columns.

    Pairs are compared as each layer's top-k appears, and only the current batch's top-k are kept:
    memory is one batch's indices for every layer, never the whole data set's."""
    n = layout.num_positions
    measure = layout.family.selection.overlap(layout.text)
    hits, totals = np.zeros((n, n)), np.zeros((n, n))
    seen: dict[int, torch.Tensor] = {}

    def compare(j, module, args, output):
        for i, earlier in seen.items():
            h, t = measure(output, earlier.to(output.device))
            hits[i, j] += h
            totals[i, j] += t
        # The diagonal is measured rather than set: it is below 1 only if a top-k held invalid indices.
        h, t = measure(output, output)
        hits[j, j] += h
        totals[j, j] += t
        seen[j] = output

    # Proxies in an all-F state run each layer's own indexer exactly as the model would, and honour
    # --indexer-chunk; hooking them (not the originals) sees each layer's top-k once, whole.
    state = sharing_state(layout, FULL * n, measure_overlap=False, chunk=chunk)
    device = model.get_input_embeddings().weight.device
    with install_sharing(layout, state):
        handles = [
            getattr(parent, layout.attr).register_forward_hook(partial(compare, p))
            for p, parent in enumerate(layout.parents) if layout.indexers[p] is not None
        ]
        try:
            for b0 in range(0, len(ids), batch_size):
                seen.clear()
                batch = ids[b0 : b0 + batch_size]
                layout.decoder(input_ids=batch.to(device) if device.type != "meta" else batch, use_cache=False)
        finally:
            for h in handles:
                h.remove()
            seen.clear()
    matrix = np.full((n, n), np.nan)
    measured = totals > 0
    matrix[measured] = hits[measured] / totals[measured]
    lower = np.tril_indices(n, -1)
    matrix[lower] = matrix.T[lower]  # only i <= j was measured; the intersection is symmetric
    return matrix


def overlap_summary(matrix: np.ndarray) -> dict:
    have = [i for i in range(len(matrix)) if not math.isnan(matrix[i, i])]
    adjacent = [float(matrix[a, b]) for a, b in zip(have, have[1:])]
    pairs = [(float(matrix[a, b]), a, b) for ai, a in enumerate(have) for b in have[ai + 1 :]]
    low = min(pairs) if pairs else None
    return {
        "mean_adjacent": math.fsum(adjacent) / len(adjacent) if adjacent else None,
        "min": low[0] if low else None,
        "min_pair": [low[1], low[2]] if low else None,
    }


def overlap(opts: Options, hooks: Hooks | None = None, tokens: str | None = None) -> dict:
    """Measure the matrix and write overlap.csv and overlap.png. Returns what the CLI prints."""
    hooks = hooks or Hooks()
    if (opts.data is None) == (tokens is None):
        raise CalibError("give exactly one of --data and --tokens")
    label = data_label(opts.data or str(tokens))
    out_dir = Path(opts.out) if opts.out else Path("outputs") / art.default_run_name(opts.model, label, "overlap")
    made = art.first_missing(out_dir)  # removed again if the run writes nothing (bad data, a wrong model)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CalibError(f"cannot write to output directory {out_dir}: {e.strerror or e}") from None
    try:
        with _memory_errors():
            prep, opts = load_inputs(opts, hooks, tokens)
            hooks.message(f"running every layer's indexer on {plural(len(prep.ids), 'sequence')} of {prep.ids.shape[1]} tokens")
            matrix = overlap_matrix(prep.model, prep.layout, prep.ids, opts.batch_size, opts.indexer_chunk)
        n = len(matrix)
        frame = pd.DataFrame(matrix, index=pd.Index(range(n), name="layer"), columns=range(n))
        csv = out_dir / OVERLAP_CSV
        art.atomic_write(csv, frame.to_csv(float_format="%.6f", na_rep="NaN", lineterminator="\n"))
        name = Path(opts.model.rstrip("/")).name or opts.model
        title = (f"{name}: top-k overlap |T_i ∩ T_j| / k\n"
                 f"k={prep.layout.budget}, {prep.ids.shape[0]} × {prep.ids.shape[1]} tokens of {Path(label).name}")
        png = overlap_plot(matrix, prep.layout.positions, title, out_dir / OVERLAP_PLOT)
    finally:
        art.remove_partial(out_dir)
        art.remove_empty_dirs(out_dir, made)
    return {
        "model": opts.model,
        "data": opts.data,
        "index_topk": prep.layout.budget,
        "num_samples": int(prep.ids.shape[0]),
        "seq_len": int(prep.ids.shape[1]),
        "layers": prep.layout.positions,
        # JSON has no NaN: layers without an indexer are null.
        "matrix": [[None if math.isnan(v) else float(v) for v in row] for row in matrix],
        **overlap_summary(matrix),
        "files": {"csv": str(csv), "png": str(png)},
    }


# -- evaluate --------------------------------------------------------------------------------------


@dataclass
class Entry:
    kind: str  # all-F, uniform, layer map, pattern
    name: str
    pattern: str


def parse_uniform(spec: str) -> list[int]:
    """'2,4,8' -> [2, 4, 8] (1/2, 1/4, 1/8 of the layers Full); '' or 'none' -> []."""
    if spec.strip().lower() in ("", "none"):
        return []
    try:
        every = [int(part) for part in spec.split(",")]
    except ValueError:
        every = []
    if not every or any(e < 2 for e in every):
        raise CalibError(f"cannot read --uniform {spec!r}", hint="give integers of at least 2, e.g. --uniform 2,4,8 for 1/2, 1/4 and 1/8 Full")
    return list(dict.fromkeys(every))


def read_layer_maps(paths: list[str]) -> list[tuple[str, dict]]:
    maps = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            path = path / art.LAYER_MAP
        lm = art.read_layer_map(path)
        if not isinstance(lm["pattern"], str):
            raise CalibError(f"{path}: 'pattern' must be a string of F and S")
        # Every run writes layer_map.json, so its directory is the name that tells runs apart.
        name = path.resolve().parent.name if path.name == art.LAYER_MAP else path.stem
        maps.append((name, lm))
    return maps


def entries(ckpt, uniform: list[int], maps: list[tuple[str, dict]], patterns: list[str]) -> list[Entry]:
    """What to score, all checked against the model: all-F first (the reference), then the baselines.
    Patterns have one character per position (decoder layer with an indexer)."""
    n, fixed, family, positions = len(ckpt.positions), ckpt.fixed_shared, ckpt.family, ckpt.positions
    out = [Entry("all-F", "all-F", all_full_pattern(ckpt))]
    # The paper's ratios (the default) stay comparable across models, even where 1/8 of a shallow model is
    # layer 0 alone; any other ratio past the layers can only have been a slip.
    past = [every for every in uniform if every > n and every not in UNIFORM_EVERY]
    if past:
        raise CalibError(f"--uniform {past[0]} asks for one Full layer every {past[0]} of the model's "
                         f"{plural(n, 'indexer layer')}: only layer 0 would be Full", hint=f"give ratios of at most {n}")
    out += [Entry("uniform", f"uniform 1/{every}", uniform_pattern(n, every, fixed)) for every in uniform]
    for name, lm in maps:
        problems = check_pattern(lm["pattern"], n, fixed)
        if lm.get("positions") is not None and list(lm["positions"]) != positions:
            problems.append(f"it was calibrated on indexer layers {lm['positions']}, this model has them at {positions}")
        if problems:
            raise CalibError(f"layer map {name} does not fit this model: {'; '.join(problems)}")
        out.append(Entry("layer map", name, lm["pattern"]))
    for i, pattern in enumerate(patterns, 1):
        problems = check_pattern(pattern, n, fixed)
        if problems:
            raise CalibError(f"--pattern {pattern!r} is invalid: {'; '.join(problems)}")
        out.append(Entry("pattern", f"pattern {i}", pattern))
    for e in out[1:]:
        why = family.runs(e.pattern, positions)
        if why and e.kind != "uniform":
            raise CalibError(f"{e.name}: {family.name} cannot run this pattern: {why}")
    return [e for e in out if e.kind != "uniform" or family.runs(e.pattern, positions) is None]


def evaluate(
    opts: Options,
    hooks: Hooks | None = None,
    tokens: str | None = None,
    uniform: str = "2,4,8",
    layer_maps: list[str] = (),
    patterns: list[str] = (),
    csv_path: str | None = None,
    lengths: list[int] | None = None,
) -> list[dict]:
    """Score all-F, uniform interleaving, layer maps and patterns with one model load, on the same
    tokens. Returns one row per entry, all-F first; with `csv_path`, also writes them there. With
    `lengths`, the same at each length (--num-samples sequences of each, drawn from --data): one row
    per entry and length, shortest first."""
    hooks = hooks or Hooks()
    every = parse_uniform(uniform)
    maps = read_layer_maps(list(layer_maps))
    patterns = list(patterns)
    csv_path = _csv_target(csv_path)
    if lengths:
        if tokens is not None:
            raise CalibError("--lengths draws sequences of each length from --data; --tokens holds one length",
                             hint="pass --data (held-out documents) with --lengths")
        check_options(opts)
        ckpt = mdl.inspect_checkpoint(mdl.resolve(opts.model), opts.trust_remote_code)
        for n in lengths:  # named as the user gave them, before the shortest becomes the loading length
            check_seq_len(replace(opts, seq_len=n), ckpt, flag="--lengths")
        # Loaded (and self-checked) at the shortest length.
        opts = replace(opts, seq_len=min(lengths))
    sets: dict[int, torch.Tensor] = {}

    def early(ckpt):  # a bad pattern is refused before any weights load
        entries(ckpt, every, maps, patterns)

    def pack_lengths(ids):  # every length's sequences, before any weights load
        sets[opts.seq_len] = ids
        if not lengths:
            return
        tokenizer = load_tokenizer(opts, mdl.resolve(opts.model))
        docs = read_documents(opts.data, tokenizer, opts.text_field)
        for n in lengths:
            sets[n] = pack(docs.texts, tokenizer, n, opts.num_samples, opts.seed)[0]
            if len(sets[n]) < opts.num_samples:
                raise CalibError(f"{opts.data} holds {plural(len(sets[n]), 'sequence')} of {n:,} tokens, fewer than "
                                 f"--num-samples {opts.num_samples}: each length is scored on as many sequences",
                                 hint="lower --num-samples or the longest of --lengths, or add data")

    with _memory_errors():
        prep, opts = load_inputs(opts, hooks, tokens, early, pack_lengths)
        todo = entries(prep.checkpoint, every, maps, patterns)
        ids_sha = tokens_sha256(prep.ids)
        for name, lm in maps:
            prov = lm.get("provenance", {})
            if mdl.same_config(prov.get("config_sha256"), prep.source) is False:
                hooks.warn(f"layer map {name} was calibrated on another model config ({prov.get('model')})")
            if tokens is None and prov.get("tokens_sha256") == ids_sha:
                hooks.warn(f"these are the very tokens layer map {name} was calibrated on, not held-out data")
        rows = []
        for seq_len, ids in sorted(sets.items()):
            if lengths:
                hooks.message(f"{seq_len:,} tokens: {plural(len(ids), 'sequence')}")
            rows += _score_entries(replace(prep, ids=ids), opts, todo, hooks)
    if csv_path is not None:
        columns = ["name", "kind", "num_full", "loss", "delta", "perplexity", "mean_overlap", "pattern"]
        if lengths:
            columns[3:3] = ["seq_len", "sequences"]
            columns[6:6] = ["paired_se"]
        art.atomic_write(csv_path, pd.DataFrame(rows, columns=columns).to_csv(index=False, float_format="%.9g", lineterminator="\n"))
    return rows


def _csv_target(csv_path: str | None) -> Path | None:
    if csv_path is None:
        return None
    path = Path(csv_path)
    if path.is_dir() or not path.resolve().parent.is_dir():
        raise CalibError(f"cannot write --out {path}: " + ("it is a directory" if path.is_dir() else "its directory does not exist"))
    return path


def _score_entries(prep: Prepared, opts: Options, todo: list[Entry], hooks: Hooks) -> list[dict]:
    """Every entry on `prep.ids`: loss, delta to all-F (the first entry) with its paired SE over the
    sequences, and each Shared layer's top-k overlap."""
    runner = make_runner(prep, opts, "none")  # every pattern is scored from layer 0; nothing to reuse
    scores, layer_overlap = {}, {}
    try:
        for e in todo:
            if e.pattern not in scores:  # a layer map may repeat a uniform pattern
                scores[e.pattern] = runner.score(e.pattern)
                layer_overlap[e.pattern] = {str(k): v for k, v in sorted(runner.last_layer_overlap.items())}
            hooks.message(f"{e.name}: {e.pattern.count(FULL)} Full, loss {scores[e.pattern].loss:.5f}")
    finally:
        runner.close()
    reference = scores[todo[0].pattern]
    rows = []
    for e in todo:
        score = scores[e.pattern]
        _, se = mean_se([a - b for a, b in zip(score.seq_losses, reference.seq_losses)])
        rows.append({
            "name": e.name,
            "kind": e.kind,
            "pattern": e.pattern,
            "num_full": e.pattern.count(FULL),
            "seq_len": int(prep.ids.shape[1]),
            "sequences": int(prep.ids.shape[0]),
            "loss": score.loss,
            "delta": score.loss - reference.loss,
            "paired_se": se if e is not todo[0] else None,
            "perplexity": math.exp(score.loss) if score.loss < 700 else None,
            "mean_overlap": score.overlap,
            "layer_overlap": layer_overlap[e.pattern],
        })
    return rows


def record_curve(arg: str, curve: dict) -> Path:
    """Write a length curve into a layer map (replacing any earlier one), atomically."""
    from indexcache_calib.length_curve import LENGTH_CURVE

    path = Path(arg)
    if path.is_dir():
        path = path / art.LAYER_MAP
    lm = art.read_layer_map(path)
    lm[LENGTH_CURVE] = curve
    art.write_json(path, lm)
    return path


# -- retrieval -------------------------------------------------------------------------------------


def evaluate_retrieval(
    opts: Options,
    hooks: Hooks | None = None,
    kinds: str = "all",
    lengths: list[int] | None = None,
    uniform: str = "2,4,8",
    layer_maps: list[str] = (),
    patterns: list[str] = (),
    csv_path: str | None = None,
) -> list[dict]:
    """Score every entry on retrieval probes built from --data (the haystack): --num-samples probes of each
    kind at each length, depths spread evenly, the same probes for every entry. One row per entry, length
    and kind: exact match and answer-token loss, their paired differences from all-Full, and by depth."""
    from indexcache_calib.objective import answer_weights
    from indexcache_calib.probes import Builder, haystack_stream, parse_kinds
    from indexcache_calib.retrieval import ProbeScores, rows_for

    hooks = hooks or Hooks()
    names = parse_kinds(kinds)
    every = parse_uniform(uniform)
    maps = read_layer_maps(list(layer_maps))
    patterns = list(patterns)
    csv_path = _csv_target(csv_path)
    lengths = sorted(set(lengths or [opts.seq_len]))
    check_options(opts)
    ckpt = mdl.inspect_checkpoint(mdl.resolve(opts.model), opts.trust_remote_code)
    for n in lengths:
        check_seq_len(replace(opts, seq_len=n), ckpt, flag="--lengths" if len(lengths) > 1 or n != opts.seq_len else "--seq-len")
    entries(ckpt, every, maps, patterns)  # a bad pattern is refused before the data is read
    tokenizer = load_tokenizer(opts, mdl.resolve(opts.model))
    docs = read_documents(opts.data, tokenizer, opts.text_field)
    builder = Builder(tokenizer, haystack_stream(docs.texts, tokenizer))
    builder.check(names, lengths, opts.data)
    probes = {n: builder.build(names, [n], opts.num_samples, opts.seed) for n in lengths}
    sets = {n: torch.tensor([p.ids for p in ps]) for n, ps in probes.items()}
    first = lengths[0]
    with _memory_errors():
        prep, opts = load_inputs(replace(opts, seq_len=first), hooks, None, None, None, ids=sets[first])
        todo = entries(prep.checkpoint, every, maps, patterns)
        rows = []
        for n in lengths:
            hooks.message(f"{n:,} tokens: {plural(len(probes[n]), 'probe')} ({', '.join(names)})")
            runner = make_runner(replace(prep, ids=sets[n]), opts, "none", weights=answer_weights(probes[n], n))
            scored: dict[str, ProbeScores] = {}
            try:
                for e in todo:
                    if e.pattern not in scored:
                        score = runner.score(e.pattern)
                        scored[e.pattern] = ProbeScores([x * runner.norm for x in score.seq_losses],
                                                        [len(p.answer) for p in probes[n]], list(runner.last_exact))
                    s = scored[e.pattern]
                    hooks.message(f"{e.name}: {e.pattern.count(FULL)} Full, exact match {sum(s.exact)}/{len(s.exact)}")
            finally:
                runner.close()
            ref = scored[todo[0].pattern]
            for e in todo:
                entry = {"name": e.name, "kind": e.kind, "pattern": e.pattern, "num_full": e.pattern.count(FULL)}
                rows += rows_for(entry, probes[n], scored[e.pattern], ref, e is todo[0])
    if csv_path is not None:
        columns = ["name", "kind", "num_full", "probe", "seq_len", "probes", "exact_match", "exact_match_delta",
                   "exact_match_se", "answer_loss", "delta", "paired_se", "pattern"]
        art.atomic_write(csv_path, pd.DataFrame(rows, columns=columns).to_csv(index=False, float_format="%.9g", lineterminator="\n"))
    return rows


def record_retrieval(arg: str, rec: dict) -> Path:
    """Write a retrieval result into a layer map (replacing any earlier one), atomically."""
    from indexcache_calib.retrieval import RETRIEVAL

    path = Path(arg)
    if path.is_dir():
        path = path / art.LAYER_MAP
    lm = art.read_layer_map(path)
    lm[RETRIEVAL] = rec
    art.write_json(path, lm)
    return path
