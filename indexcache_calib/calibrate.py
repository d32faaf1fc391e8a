"""The calibration pipeline: data and model in, layer map out. The CLI only parses options and draws."""

from __future__ import annotations

import json
import math
import platform
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import accelerate
import torch
from accelerate.utils import convert_file_size_to_int

from indexcache_calib import __version__
from indexcache_calib import artifact as art
from indexcache_calib import data as dat
from indexcache_calib import dryrun
from indexcache_calib import model as mdl
from indexcache_calib import objective as obj
from indexcache_calib.data import tokens_sha256
from indexcache_calib.deploy import consumer_keys, engine_args
from indexcache_calib.errors import EXIT_OUT_OF_MEMORY, EXIT_RESUME_MISMATCH, CalibError, check_resume_overwrite, is_out_of_memory, plural
from indexcache_calib.parallel import ParallelEvaluator, init_world, replica_max_memory, sum_counters
from indexcache_calib.pattern import (
    FULL, SHARED, UNIFORM_EVERY, full_layers, indexer_types, resolve_num_full, source_layers, uniform_baselines, uniform_pattern,
    validate_pattern,
)
from indexcache_calib.plots import calibration_plots
from indexcache_calib.search import (
    DECIDED_SE, DEFAULT_SEARCH, RETIRED, SEARCHES, Race, Score, Step, greedy_search, path, race_summary,
)

# transformers, and runner and attention (which import it), are imported inside the functions that use them:
# transformers imports huggingface_hub, which reads HF_HUB_OFFLINE once, when imported, and the commands set it
# (cli_common._quiet_libraries) after importing this module; see the note at the top of training/convert.py.

ATTENTION_PATHS = ("auto", "sparse", "dense")
OOM_HINT = ("lower --seq-len, --num-samples or --batch-size, use --attention sparse where the family allows it, set "
            "--indexer-chunk, give more --max-memory, or use --cache-device cpu|disk")


@dataclass
class Options:
    model: str
    data: str
    target: str | None = None
    num_full: int | None = None
    out: str | None = None
    seq_len: int = 512
    num_samples: int = 8
    seed: int = 0
    batch_size: int = 1
    search: str = DEFAULT_SEARCH
    text_field: str = "text"
    overlap: bool = True
    indexer_chunk: int | None = None  # query rows per indexer call; None = automatic, 0 = one call
    cache_device: str = "cpu"
    device_map: str = "auto"
    dtype: str = "auto"
    max_memory: str | None = None
    offload_dir: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    resume: bool = False
    overwrite: bool = False
    plots: bool = True
    start_pattern: str | None = None  # begin the search here instead of all-F
    cache_budget: str | None = None  # e.g. "64GiB": a larger prefix cache goes to disk
    # --search race (the default); None: the default of `search.Race`. Set for another search, refused.
    race_alpha: float | None = None  # chance per step of dropping the best candidate raced
    race_first: int | None = None  # sequences in the first round
    tolerance: str | float | None = None  # nats per step, "auto", or 0 for none (see search.Race)
    attention: str = "auto"  # sparse, dense, or auto: sparse where the family passes its selection as indices
    objective: str = obj.DEFAULT_OBJECTIVE  # what a pattern is scored on (objective.OBJECTIVES)
    retrieval: str | None = None  # --objective retrieval: the probe kinds, as given ("all", "needle,copy")
    key_window: int | None = None  # --objective key-tokens: the short context (None: from the indexer's budget)
    key_margin: float = obj.DEFAULT_KEY_MARGIN  # --objective key-tokens: nats a key token gains from far context

    def fingerprint_fields(self, ckpt) -> dict:
        # What must not change between a run and its resume. The target may: F-sets are nested, so a
        # resumed run can stop later or earlier on the same path. The attention path is recorded as
        # resolved: `auto` and the path it picks are one run.
        fields = ("seq_len", "num_samples", "seed", "batch_size", "search", "text_field", "dtype", "start_pattern")
        settings = {k: getattr(self, k) for k in fields}
        if self.search == "race":  # as the race takes them ("0.010" and "0.01" are one run)
            race = self.race()
            settings.update(race_alpha=race.alpha, race_first=race.first, tolerance=race.tolerance)
        if not self.overlap:
            # Absent while measured, as in older checkpoints: a trace half with overlap and half without
            # would say neither. `same_fingerprint` reads a missing value as measured.
            settings["overlap"] = False
        if self.objective != obj.DEFAULT_OBJECTIVE:  # absent for lm, as in checkpoints written before objectives
            settings["objective"] = self.objective
            if self.objective == "retrieval":
                from indexcache_calib.probes import parse_kinds

                settings["retrieval"] = parse_kinds(self.retrieval)
            else:
                rule = key_rule(self, ckpt)
                settings.update(key_window=rule.window, key_margin=rule.margin)
        return {**settings, "attention": attention_for(self, ckpt)}

    def race(self) -> Race:
        """The race's settings, the defaults where none was given (after `check_options`)."""
        given = {"alpha": self.race_alpha, "first": self.race_first, "tolerance": parse_tolerance(self.tolerance)}
        return Race(**{k: v for k, v in given.items() if v is not None})


@dataclass
class Hooks:
    """Progress callbacks; all optional."""

    # Not trainloop.Hooks: a search reports steps of a greedy path, their candidates and a forward's sequences,
    # training reports optimizer steps with their loss; only `message` is shared.

    message: Callable[[str], None] = lambda text: None
    warn: Callable[[str], None] = lambda text: None
    started: Callable[[Path], None] = lambda run_dir: None  # the run directory, once it is known
    search_started: Callable[[int, int], None] = lambda steps, first_candidates: None
    candidate: Callable[[int, int, int], None] = lambda step, done, total: None
    sequences: Callable[[int, int], None] = lambda done, total: None  # within one forward of a pattern
    step: Callable[[Step], None] = lambda step: None
    # decoder-layer forwards done this session, and typically needed by the search in all (`dryrun.search_work`);
    # called before each step's `step`
    work: Callable[[int, int], None] = lambda done, expected: None


@dataclass
class Prepared:
    """A loaded model and packed tokens: what `calibrate`, `evaluate` and `overlap` all start from."""

    source: object
    model: object
    layout: object
    tokenizer: object
    ids: object
    available: int
    data_sha256: str | None
    skipped: list[str] = field(default_factory=list)
    checkpoint: object = None  # model.Checkpoint
    self_check: dict = field(default_factory=dict)
    weights: object = None  # the objective's token weights [sequences, seq_len - 1]; None: every token (lm)
    objective: dict | None = None  # what the layer map records of the objective


@dataclass
class Tokens:
    """The calibration tokens, read and packed before any weights load."""

    tokenizer: object
    ids: object
    available: int
    data_sha256: str | None
    skipped: list[str] = field(default_factory=list)
    weights: object = None  # --objective retrieval: the probes' answer tokens, known before any weights load
    objective: dict | None = None  # what the layer map records of the objective, where known before loading


@dataclass
class RunPlan:
    """What a calibration run has checked and read before any weights load; the dry run stops here."""

    source: object
    ckpt: object  # model.Checkpoint
    num_full: int
    start: str
    run_dir: Path
    saved: dict | None  # the checkpoint resumed from
    tokens: Tokens | None  # None only in a dry run on a checkpoint without a tokenizer
    cache_device: str = "cpu"  # where the prefix cache goes, settled against --cache-budget and free disk


def dry_run(opts: Options) -> dict:
    """Run every check the real run makes before loading weights (options, model, target, start pattern,
    run directory, resume, data), then estimate what the run needs; loads no weights."""
    notes: list[str] = []
    run = plan_run(opts, Hooks(message=notes.append, warn=notes.append), dry=True)
    planned = replace(opts, cache_device=run.cache_device)
    if run.tokens is not None and len(run.tokens.ids) < opts.num_samples:  # what the run will calibrate on
        planned = replace(planned, num_samples=len(run.tokens.ids))
    estimate = dryrun.plan(planned, run.ckpt, run.num_full, attention_for(opts, run.ckpt))
    estimate["warnings"][:0] = notes
    return estimate


def plan_run(opts: Options, hooks: Hooks, dry: bool = False) -> RunPlan:
    """Every check that needs no weights, in the order a user fixes them, changing nothing on disk:
    options, model, target and start pattern, the run directory and its checkpoint, then the data,
    tokenized and packed (a dry run on a config without a tokenizer reads the data but cannot pack it)."""
    check_options(opts)
    source = mdl.resolve(opts.model)
    ckpt = mdl.inspect_checkpoint(source, opts.trust_remote_code)
    check_for_family(opts, ckpt)
    num_full, start = search_plan(opts, ckpt)
    config_sha = mdl.config_sha256(source)
    # Named by the resolved number of Full layers: 1/4, 25%, 0.25 and --num-full N are one run.
    run_dir = Path(opts.out) if opts.out else Path("outputs") / art.default_run_name(opts.model, opts.data, f"{num_full}F")
    saved = None
    if opts.resume:
        if opts.out is None and not (run_dir / art.CHECKPOINT).exists():
            run_dir = resumable_sibling(run_dir, num_full, opts, config_sha, ckpt, hooks)
        saved = read_checkpoint(run_dir)
        check_resume_settings(run_dir, saved["fingerprint"], opts, config_sha, ckpt)
        check_steps(run_dir / art.CHECKPOINT, saved["steps"], start)
    art.check_run_dir(run_dir, opts.resume, opts.overwrite)
    try:
        tokenizer = load_tokenizer(opts, source)
    except CalibError as e:
        if not dry:
            raise
        dat.read_documents(opts.data, None, opts.text_field)  # the file itself is still checked
        hooks.warn(f"{e.message}: the data was read but not tokenized, so whether it fills --num-samples is unchecked")
        return RunPlan(source, ckpt, num_full, start, run_dir, saved, None, plan_cache_device(opts, ckpt, opts.num_samples, hooks))
    tokens = read_tokens(opts, hooks, tokenizer)
    if saved is not None:  # a resume on other tokens is refused here too
        check_fingerprint(run_dir, {"tokens_sha256": saved["fingerprint"].get("tokens_sha256")},
                          {"tokens_sha256": tokens_sha256(tokens.ids)})
    return RunPlan(source, ckpt, num_full, start, run_dir, saved, tokens, plan_cache_device(opts, ckpt, len(tokens.ids), hooks))


def plan_cache_device(opts: Options, ckpt, num_samples: int, hooks: Hooks) -> str:
    """Where the prefix cache goes, decided from the config before any weight loads (a terabyte cache
    that does not fit the disk is refused before the weights take an hour to load)."""
    device, why = resolved_cache_device(opts)
    if why:
        hooks.warn(why)
    elem = torch.tensor([], dtype=dryrun.planned_dtype(opts, mdl.loading_config(ckpt))).element_size()
    return settle_cache_device(opts, device, dryrun.cache_need(opts, ckpt, num_samples, elem), hooks)


def settle_cache_device(opts: Options, device: str, need: int, hooks: Hooks) -> str:
    """Past --cache-budget the cache goes to disk; on disk it must fit the free space of TMPDIR."""
    if not need:
        return device
    if opts.cache_budget and need > convert_file_size_to_int(opts.cache_budget) and device != "disk":
        hooks.warn(f"the prefix cache needs up to {dryrun.size_str(need)}, over --cache-budget {opts.cache_budget}: keeping it on disk")
        device = "disk"
    if device == "disk":
        free = shutil.disk_usage(tempfile.gettempdir()).free
        if need > free:
            raise CalibError(
                f"the prefix cache needs up to {dryrun.size_str(need)} on disk, but {tempfile.gettempdir()} has {dryrun.size_str(free)} free",
                hint="point TMPDIR at a larger disk, lower --num-samples or --seq-len, or use --cache-device none",
            )
    return device


def resumable_sibling(run_dir: Path, num_full: int, opts: Options, config_sha: str | None, ckpt, hooks: Hooks) -> Path:
    """With the default --out, a run resumed with another target looks for its checkpoint under another
    Full count (`..._4F` for `..._8F`): the run of the same model and data whose settings match."""
    prefix = run_dir.name[: -len(f"{num_full}F")]
    if not run_dir.name.endswith(f"_{num_full}F") or not run_dir.parent.is_dir():
        return run_dir
    siblings = sorted(d for d in run_dir.parent.iterdir()
                      if re.fullmatch(re.escape(prefix) + r"\d+F", d.name) and (d / art.CHECKPOINT).is_file())
    matching = []
    for d in siblings:
        try:
            check_resume_settings(d, read_checkpoint(d)["fingerprint"], opts, config_sha, ckpt)
        except CalibError:
            continue
        matching.append(d)
    if len(matching) == 1:
        hooks.message(f"resuming {matching[0]}: the run of this model and data with these settings "
                      f"(nothing in {run_dir}; the target may change on resume, and the layer map goes to {matching[0]})")
        return matching[0]
    if matching:
        raise CalibError(f"nothing to resume in {run_dir}; {len(matching)} runs of this model and data have these settings: "
                         f"{', '.join(map(str, matching))}", hint="name the one to resume with --out DIR --resume")
    if siblings:
        raise CalibError(f"nothing to resume: {run_dir / art.CHECKPOINT} does not exist, and the runs of this model and data "
                         f"({', '.join(map(str, siblings))}) were made with other settings",
                         hint="resume one with --out DIR --resume and its settings, or run without --resume to start")
    return run_dir


def attention_for(opts: Options, ckpt) -> str:
    """The attention path the run takes: `sparse` where the family's attention consumes its selection,
    `dense` where it cannot (and `--attention sparse` there is refused, with the reason)."""
    why = ckpt.family.dense_only
    if opts.attention == "sparse" and why:
        raise CalibError(f"--attention sparse is not possible for {ckpt.family.name}: {why}",
                         hint="use --attention dense (or auto); calibrate at the longest length the dense path fits")
    return "dense" if opts.attention == "dense" or why else "sparse"


def check_for_family(opts: Options, ckpt) -> None:
    """What depends on the model family, checked before any weights load."""
    check_seq_len(opts, ckpt)
    attention_for(opts, ckpt)
    if opts.objective == "key-tokens":
        key_rule(opts, ckpt)
    if opts.indexer_chunk and not ckpt.family.chunks:
        raise CalibError(
            f"--indexer-chunk {opts.indexer_chunk} is not possible for {ckpt.family.name}: its indexer cannot score "
            "queries in chunks against keys computed once",
            hint="leave --indexer-chunk out; this family's indexer runs in one call",
        )


def key_rule(opts: Options, ckpt) -> obj.KeyRule:
    """--objective key-tokens' rule, its window defaulting to the model's indexer budget."""
    return obj.key_rule(opts.key_window, opts.key_margin, ckpt.family.seq_len_floor(ckpt.text), opts.seq_len)


def check_seq_len(opts: Options, ckpt, flag: str = "--seq-len") -> None:
    family = ckpt.family
    check_seq_len_floor(opts.seq_len, family.seq_len_floor(ckpt.text), family.budget_words(ckpt.text),
                        "every layer's top-k is the same and sharing an indexer changes nothing",
                        getattr(ckpt.text, "max_position_embeddings", None), owner="the model's ", flag=flag)


def check_seq_len_floor(seq_len: int, floor: int, budget_words: str, consequence: str, max_pos: int | None,
                        owner: str = "", hint_more: str = "", flag: str = "--seq-len") -> None:
    """The one sequence-length check of every command (calibrate, overlap, evaluate, dsa-convert, distill):
    above the family's floor (`Family.seq_len_floor`: at or below it every query selects every key, in
    tokens, which is not index_topk where the family selects blocks or compressed entries), and within the
    model's positions. `budget_words`: the budget as the config names it (`Family.budget_words`)."""
    if seq_len <= floor:
        budget = budget_words if budget_words.endswith(f" {floor}") else f"{budget_words}: {floor} tokens"
        raise CalibError(
            f"{flag} {seq_len} is not above {owner}{budget}: every token would be selected, so {consequence}",
            hint=f"use a {flag} above {floor} (at {2 * floor} or more, each top-k leaves out most keys){hint_more}",
        )
    if max_pos and seq_len > max_pos:
        raise CalibError(f"{flag} {seq_len} exceeds the model's max_position_embeddings {max_pos}")


def parse_tolerance(value) -> float | str | None:
    """--tolerance as the search takes it: None, "auto", or a finite number of nats >= 0."""
    if value is None or value == "auto":
        return value
    try:
        nats = float(value)
    except (TypeError, ValueError):
        nats = None
    if nats is None or not math.isfinite(nats) or nats < 0:
        raise CalibError(f"--tolerance {value} is not a number of nats >= 0 or 'auto'",
                         hint="use e.g. --tolerance 0.001 (nats per step) or --tolerance auto")
    return nats


def check_options(opts: Options) -> None:
    from indexcache_calib.runner import CACHE_DEVICES  # deferred: see HF_HUB_OFFLINE at the top

    if opts.cache_device not in CACHE_DEVICES:
        raise CalibError(f"unknown --cache-device {opts.cache_device!r}", hint=f"use one of {', '.join(CACHE_DEVICES)}")
    if opts.search in RETIRED:
        raise CalibError(f"--search {opts.search} is retired: {RETIRED[opts.search]}",
                         hint=f"leave --search out, or use one of {', '.join(SEARCHES)}")
    if opts.search not in SEARCHES:
        raise CalibError(f"unknown --search {opts.search!r}", hint=f"use one of {', '.join(SEARCHES)}")
    for name in ("seq_len", "num_samples", "batch_size"):
        if getattr(opts, name) < 1:
            raise CalibError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.indexer_chunk is not None and opts.indexer_chunk < 0:
        raise CalibError("--indexer-chunk must be 0 (one call) or a number of query rows")
    if opts.attention not in ATTENTION_PATHS:
        raise CalibError(f"unknown --attention {opts.attention!r}", hint=f"use one of {', '.join(ATTENTION_PATHS)}")
    given = [f"--{name.replace('_', '-')}" for name in ("race_alpha", "race_first", "tolerance") if getattr(opts, name) is not None]
    if given and opts.search != "race":
        raise CalibError(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} the race, not --search {opts.search}",
                         hint="leave --search out (race is the default), or leave " + " and ".join(given) + " out")
    if opts.race_alpha is not None and not 0 < opts.race_alpha < 0.5:
        raise CalibError(f"--race-alpha {opts.race_alpha} is not between 0 and 0.5 (the confidence, 1 - alpha, is "
                         "between 0.5 and 1)", hint="use e.g. 0.05")
    if opts.race_first is not None and opts.race_first < 2:
        raise CalibError("--race-first must be at least 2 sequences", hint="a paired standard error needs two")
    parse_tolerance(opts.tolerance)
    obj.check_objective(opts.objective, opts.retrieval)
    if opts.retrieval:
        from indexcache_calib.probes import parse_kinds

        parse_kinds(opts.retrieval)
    if opts.race_first is not None and -(-opts.race_first // opts.batch_size) >= -(-opts.num_samples // opts.batch_size):
        raise CalibError(
            f"--race-first {opts.race_first} with {plural(opts.num_samples, 'sequence')}: the first round already "
            "scores every sequence, so there is nothing to race",
            hint="use more --num-samples or a smaller --race-first, or --search exact",
        )
    check_resume_overwrite(opts.resume, opts.overwrite)
    check_placement(opts)


def check_placement(opts: Options) -> None:
    """--dtype, --device-map, --max-memory and --cache-budget, before anything loads (the dry run too)."""
    if opts.dtype not in mdl.DTYPES:
        raise CalibError(f"unknown --dtype {opts.dtype!r}", hint=f"use one of {', '.join(mdl.DTYPES)}")
    device_map = mdl.parse_device_map(opts.device_map)
    wants_gpu = (isinstance(device_map, str) and device_map.startswith("cuda")) or (
        isinstance(device_map, dict) and any(isinstance(d, int) or str(d).startswith("cuda") for d in device_map.values()))
    if wants_gpu and not torch.cuda.is_available():
        raise CalibError(
            f"--device-map {opts.device_map} places the model on a GPU, but this torch ({torch.__version__}) sees none",
            hint="use --device-map cpu (or auto), or install a CUDA build of torch on a GPU host",
        )
    mdl.parse_max_memory(opts.max_memory)
    if opts.cache_budget:
        try:
            convert_file_size_to_int(opts.cache_budget)
        except ValueError:
            raise CalibError(f"cannot read --cache-budget {opts.cache_budget!r}", hint="use e.g. 64GiB or 500MB") from None


def resolved_cache_device(opts: Options) -> tuple[str, str | None]:
    """The cache device the run will really use, and a warning when that is not what was asked."""
    if opts.cache_device == "gpu" and not torch.cuda.is_available():
        return "cpu", "--cache-device gpu on a host without a GPU: the prefix cache stays on cpu"
    return opts.cache_device, None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(opts: Options, source):
    from transformers import AutoTokenizer  # deferred: see HF_HUB_OFFLINE at the top

    try:
        return AutoTokenizer.from_pretrained(source.location, local_files_only=True, trust_remote_code=opts.trust_remote_code)
    except (OSError, ValueError) as e:
        where = Path(str(source.location))
        if where.is_dir() and not any((where / f).exists() for f in TOKENIZER_FILES):
            raise CalibError(f"cannot load the tokenizer of {opts.model}: it has none of {', '.join(TOKENIZER_FILES)}") from None
        first = next((line.strip().rstrip(":") for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CalibError(f"cannot load the tokenizer of {opts.model}: {first}") from None


def read_tokens(opts: Options, hooks: Hooks, tokenizer) -> Tokens:
    """--data read, tokenized and packed into --num-samples sequences of --seq-len tokens."""
    docs = dat.read_documents(opts.data, tokenizer, opts.text_field)
    for note in docs.skipped:
        hooks.warn(f"{opts.data}: skipped {note}")
    for note in docs.notes:
        hooks.warn(f"{opts.data}: {note}")
    if opts.objective == "retrieval":
        return retrieval_tokens(opts, tokenizer, docs)
    ids, available = dat.pack(docs.texts, tokenizer, opts.seq_len, opts.num_samples, opts.seed)
    if available < opts.num_samples:
        hooks.warn(f"the data fills only {plural(available, 'sequence')} of {opts.seq_len} tokens; "
                   f"calibrating on {available}, not {opts.num_samples}")
    return Tokens(tokenizer, ids, available, dat.file_sha256(opts.data), docs.skipped)


def retrieval_tokens(opts: Options, tokenizer, docs) -> Tokens:
    """--objective retrieval: --num-samples probes of --seq-len tokens from --data as the haystack, the kinds
    taking turns and each kind's depths spread evenly; the answer tokens are the weights."""
    from indexcache_calib.probes import Builder, haystack_stream, parse_kinds

    kinds = parse_kinds(opts.retrieval)
    builder = Builder(tokenizer, haystack_stream(docs.texts, tokenizer))
    builder.check(kinds, [opts.seq_len], opts.data)
    per_kind = -(-opts.num_samples // len(kinds))
    built = builder.build(kinds, [opts.seq_len], per_kind, opts.seed)
    by_kind = [built[k * per_kind : (k + 1) * per_kind] for k in range(len(kinds))]
    probes = [p for group in zip(*by_kind) for p in group][: opts.num_samples]
    weights = obj.answer_weights(probes, opts.seq_len)
    info = {"name": "retrieval", "kinds": kinds, "seq_len": opts.seq_len, "seed": opts.seed, "probes": len(probes),
            "answer_tokens": int(weights.sum()), "data": opts.data, "data_sha256": dat.file_sha256(opts.data)}
    ids = torch.tensor([p.ids for p in probes], dtype=torch.long)
    return Tokens(tokenizer, ids, len(probes), dat.file_sha256(opts.data), docs.skipped, weights, info)


def prepare(opts: Options, hooks: Hooks, ids=None, check_config=None, ckpt=None, before_loading=None,
            tokens: Tokens | None = None) -> Prepared:
    """Resolve and check everything cheap first (config, weight names, data, lengths), then load the
    weights, then check that this tool's all-Full loss is the model's own. `before_loading(ids)` runs
    once the calibration tokens are known, before any weights load. `tokens`: already read and packed."""
    from indexcache_calib.attention import set_attention  # deferred: see HF_HUB_OFFLINE at the top
    from indexcache_calib.runner import self_check  # deferred: see HF_HUB_OFFLINE at the top

    check_placement(opts)
    source = mdl.resolve(opts.model)
    ckpt = ckpt or mdl.inspect_checkpoint(source, opts.trust_remote_code)
    check_for_family(opts, ckpt)
    if check_config is not None:
        check_config(ckpt)
    if tokens is None:
        tokenizer = load_tokenizer(opts, source)
        if ids is None:
            tokens = read_tokens(opts, hooks, tokenizer)
        else:
            tokens = Tokens(tokenizer, ids, len(ids), dat.file_sha256(opts.data))
    tokenizer, ids = tokens.tokenizer, tokens.ids
    if before_loading is not None:
        before_loading(ids)
    if ckpt.config_shared:
        hooks.message(
            f"Note: the config of {opts.model} carries a pattern ({plural(len(ckpt.config_shared), 'layer')} marked shared); their "
            "indexer weights are in the checkpoint, so they are restored and all-Full is measured with every indexer")
    hooks.message(f"loading {source.location}")
    max_memory = replica_max_memory(init_world(), mdl.parse_max_memory(opts.max_memory))
    model = mdl.load_model(
        source, opts.device_map, opts.dtype, max_memory, opts.offload_dir, opts.trust_remote_code, opts.allow_pickle, ckpt
    )
    layout = mdl.find_dsa(model, ckpt, opts.model)
    set_attention(model, attention_for(opts, ckpt))
    check = self_check(model, layout, ids, opts.model, opts.indexer_chunk)
    return Prepared(source, model, layout, tokenizer, ids, tokens.available, tokens.data_sha256, tokens.skipped, ckpt, check)


def all_full_pattern(ckpt) -> str:
    """Every position F, except those whose checkpoint has no indexer weights."""
    return "".join(SHARED if p in ckpt.fixed_shared else FULL for p in range(len(ckpt.positions)))


def search_plan(opts: Options, ckpt) -> tuple[int, str]:
    """(number of full positions to stop at, pattern to start from), checked before any weights load.
    Targets count pattern positions only: layers with no indexer by architecture are not layers to keep."""
    positions, fixed, family = ckpt.positions, ckpt.fixed_shared, ckpt.family
    num_full = resolve_num_full(len(positions), opts.target, opts.num_full, fixed, family.fewest_full(positions, fixed))
    start = all_full_pattern(ckpt)
    if opts.start_pattern:
        start = validate_pattern(opts.start_pattern, len(positions), fixed)
        why = family.runs(start, positions)
        if why:
            raise CalibError(f"the start pattern cannot run on {family.name}: {why}")
    if start.count(FULL) <= num_full:
        what = "the start pattern" if opts.start_pattern else "all-Full"
        raise CalibError(
            f"{what} has {plural(start.count(FULL), 'full layer')}; nothing to share for a target of {num_full}",
            hint="choose a target below the number of full layers you start from",
        )
    return num_full, start


def make_runner(prep: Prepared, opts: Options, cache_device: str | None = None, weights=None):
    """`cache_device`: where the prefix cache goes (`choose_cache_device`); default --cache-device as given.
    `weights`: the objective's token weights (default the prepared run's; None scores every token)."""
    from indexcache_calib.runner import PatternRunner  # deferred: see HF_HUB_OFFLINE at the top

    # The naive search is the paper's reference: every candidate is a full forward, no prefix reuse.
    cache_device = opts.cache_device if cache_device is None else cache_device
    return PatternRunner(
        prep.model, prep.layout, prep.ids, batch_size=opts.batch_size, measure_overlap=opts.overlap,
        indexer_chunk=opts.indexer_chunk, cache_device="none" if opts.search == "naive" else cache_device,
        weights=prep.weights if weights is None else weights,
    )


def choose_cache_device(opts: Options, prep: Prepared, planned: str, hooks: Hooks) -> str:
    """The planned cache device (`plan_cache_device`), checked again against the loaded weights' dtype."""
    if opts.search == "naive" or opts.cache_device == "none":
        return opts.cache_device
    elem = next(prep.model.parameters()).element_size()
    return settle_cache_device(opts, planned, dryrun.cache_need(opts, prep.checkpoint, len(prep.ids), elem), hooks)


def fingerprint(opts: Options, prep: Prepared, config_sha: str | None) -> dict:
    return {
        "config_sha256": config_sha,
        "tokens_sha256": tokens_sha256(prep.ids),
        "settings": opts.fingerprint_fields(prep.checkpoint),
        "tool_version": __version__,
        "num_layers": prep.layout.num_layers,
    }


def read_checkpoint(run_dir: Path) -> dict:
    path = run_dir / art.CHECKPOINT
    if not path.exists():
        raise CalibError(f"nothing to resume: {path} does not exist", hint="run without --resume to start")
    try:
        data = json.loads(path.read_text())
        data["steps"] = [Step.from_json(s) for s in data["steps"]]
        if not isinstance(data["fingerprint"], dict) or not isinstance(data["fingerprint"]["settings"], dict):
            raise TypeError("the fingerprint is not an object with settings")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CalibError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e})", hint="start again with --overwrite")
    return data


def check_steps(path: Path, steps: list[Step], start: str) -> None:
    """A checkpoint that parses can still be damaged: every step must flip one Full layer of the step
    before it to Shared, chosen among its own scored candidates. Checked before any weights load."""
    base = start
    for number, s in enumerate(steps, 1):
        problem = _step_problem(s, number, base)
        if problem:
            raise CalibError(f"checkpoint {path} is corrupt: step {number} {problem}", hint="start again with --overwrite")
        base = s.pattern


def _step_problem(s: Step, number: int, base: str) -> str | None:
    def number_ok(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if s.step != number:
        return f"is numbered {s.step!r}"
    if s.base != base:
        return "does not start from the pattern the step before it ended with"
    if not isinstance(s.chosen, int) or isinstance(s.chosen, bool) or s.chosen not in s.scores:
        return f"chose layer {s.chosen!r}, which is not among its scored candidates ({sorted(s.scores)})"
    for layer, score in s.scores.items():
        if not 0 <= layer < len(base) or base[layer] != FULL:
            return f"scored candidate {layer}, which is not a Full layer of its start pattern"
        if not number_ok(score.loss) or not isinstance(score.seq_losses, list) or not all(map(number_ok, score.seq_losses)):
            return f"has a loss for candidate {layer} that is not a list of finite numbers"
    if s.pattern != base[: s.chosen] + SHARED + base[s.chosen + 1 :]:
        return f"ended with {s.pattern!r}, not its start pattern with layer {s.chosen} shared"
    if not number_ok(s.base_loss):
        return f"has a base loss of {s.base_loss!r}"
    return None


def _overlap_measured(fp: dict) -> dict:
    """Fingerprints leave `settings.overlap` out while overlap is measured (older checkpoints too)."""
    settings = fp.get("settings")
    if isinstance(settings, dict) and "overlap" not in settings:
        fp = {**fp, "settings": {**settings, "overlap": True}}
    return fp


def check_fingerprint(run_dir: Path, saved: dict, fp: dict) -> None:
    saved, fp = _overlap_measured(saved), _overlap_measured(fp)
    if saved != fp:
        changed = art.changed_settings(saved, fp)
        raise CalibError(
            f"cannot resume {run_dir}: {'; '.join(changed)} changed since the checkpoint was written",
            hint="resume with the same model, data and settings, or start again with --overwrite",
            exit_code=EXIT_RESUME_MISMATCH,
        )


def check_resume_settings(run_dir: Path, saved: dict, opts: Options, config_sha: str | None, ckpt) -> None:
    """The parts of the fingerprint known before any data or weights load."""
    early = {k: saved.get(k) for k in ("settings", "tool_version", "config_sha256")}
    now = {"settings": opts.fingerprint_fields(ckpt), "tool_version": __version__, "config_sha256": config_sha}
    check_fingerprint(run_dir, early, now)


def race_section(opts: Options, steps: list[Step], positions: list[int]) -> dict:
    """The layer map's race settings and, per step, which candidates entered and what was dropped when
    and why; the tolerance (requested, and in nats per step), the confidence, and what it can have cost."""
    race = opts.race()
    summary = race_summary(steps, race, positions)
    per_step = [r["tolerance"] for r in summary["steps"]]
    section = {
        "alpha": race.alpha, "confidence": 1 - race.alpha, "first_sequences": race.first, "entered_first": race.enter,
        "tolerance": {
            "requested": race.tolerance,
            "nats_per_step": per_step,
            "steps_ended_early": summary["steps_ended_early"],
            # Against the best candidate each step raced (not Algorithm 1's end point: the paths may part).
            "given_away_at_most": summary["given_away_at_most"],
        },
    }
    return {"race": section, "race_steps": summary["steps"]}


def session_summary(steps: list[Step], resumed: int) -> dict:
    """What this session searched: the steps after the `resumed` ones read from the checkpoint, and their
    candidates. The layer map's `search` counts the whole search, earlier sessions included."""
    mine = steps[resumed:]
    return {
        "resumed_after_step": resumed,
        "steps": len(mine),
        "candidates_scored": sum(len(s.scores) for s in mine),
        "candidate_sequences": sum(len(sc.seq_losses) for s in mine for sc in s.scores.values()),
    }


def versions() -> dict:
    import transformers  # deferred: see HF_HUB_OFFLINE at the top

    return {
        "accelerate": accelerate.__version__,
        "indexcache": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def calibrate(opts: Options, hooks: Hooks | None = None) -> tuple[dict, Path]:
    """Run the search and write the artifact. Returns (layer map, run directory). Everything that can be
    checked without weights is checked before the run directory is touched."""
    world = init_world()
    hooks = (hooks or Hooks()) if world.is_main else Hooks()
    t_start = time.time()
    run = plan_run(opts, hooks)
    run_dir = run.run_dir
    made = art.first_missing(run_dir)  # what creating the run directory adds, removed again if left empty
    had_tokens = (run_dir / art.TOKENS).exists()
    world.barrier()  # every rank has checked before rank 0 changes anything
    if world.is_main:
        art.prepare_run_dir(run_dir, opts.resume, opts.overwrite)
    hooks.started(run_dir)
    try:
        return _calibrate(opts, hooks, run, t_start, world)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise CalibError("out of memory", hint=OOM_HINT, exit_code=EXIT_OUT_OF_MEMORY) from None
    finally:
        if world.is_main:
            art.remove_partial(run_dir)
            if not had_tokens and not art.has_results(run_dir):  # stopped before the first step: nothing saved
                (run_dir / art.TOKENS).unlink(missing_ok=True)
            art.remove_empty_dirs(run_dir, made)


def _calibrate(opts: Options, hooks: Hooks, run: RunPlan, t_start: float, world) -> tuple[dict, Path]:
    """Load, resume, search, and write the layer map (rank 0; other ranks return ({}, run_dir))."""
    run_dir = run.run_dir
    prep = prepare(opts, hooks, ckpt=run.ckpt, tokens=run.tokens)
    prep.weights, prep.objective = objective_weights(opts, hooks, prep, run)
    if world.is_main:  # before the first step, so an interrupted run can be scored (evaluate --tokens)
        art.save_tokens(run_dir / art.TOKENS, prep.ids, {"tokens_sha256": tokens_sha256(prep.ids), "seq_len": opts.seq_len,
                                                         "objective": opts.objective}, prep.weights)
    config_sha = mdl.config_sha256(prep.source)
    fp = fingerprint(opts, prep, config_sha)
    resumed = resume_steps(run_dir, run.saved, fp, run.num_full, hooks)
    cache_device = choose_cache_device(opts, prep, run.cache_device, hooks)
    result = run_search(opts, hooks, prep, run, fp, resumed, cache_device, world)
    if not world.is_main:
        return {}, run_dir
    environment = {
        "wall_seconds": round(time.time() - t_start, 3),
        "processes": world.size,
        "cache_device": cache_device,
        "host_platform": platform.platform(),
    }
    layer_map = build_layer_map(opts, prep.layout, result, provenance(opts, prep, config_sha), environment,
                                composite=prep.checkpoint.text is not prep.checkpoint.config, objective=prep.objective)
    if opts.plots:
        calibration_plots(layer_map, run_dir)
    art.write_json(run_dir / art.LAYER_MAP, layer_map)
    return layer_map, run_dir


def objective_weights(opts: Options, hooks: Hooks, prep: Prepared, run: RunPlan):
    """The token weights the search scores, and what the layer map records of the objective. Key tokens are
    found here, on the loaded all-Full model, once per run: a resumed run reads them back from its tokens file."""
    if opts.objective == "lm":
        return None, {"name": "lm"}
    if opts.objective == "retrieval":
        return run.tokens.weights, run.tokens.objective
    rule = key_rule(opts, prep.checkpoint)
    saved = run.run_dir / art.TOKENS
    if opts.resume and saved.is_file():
        old = art.load_token_weights(saved)
        if old is not None and torch.equal(art.load_tokens(saved), prep.ids) and run.saved is not None:
            info = run.saved.get("objective")
            if info and info.get("window") == rule.window and info.get("margin") == rule.margin:
                return old, info
    from indexcache_calib.runner import PatternRunner  # deferred: see HF_HUB_OFFLINE at the top

    hooks.message(f"finding key tokens: every sequence whole, then in windows of {2 * rule.window + 1:,} tokens (all-Full)")
    all_full = all_full_pattern(prep.checkpoint)

    def losses(ids):
        runner = PatternRunner(prep.model, prep.layout, ids, batch_size=opts.batch_size, measure_overlap=False,
                               indexer_chunk=opts.indexer_chunk, cache_device="none")
        return runner.token_losses(all_full)

    weights, info = obj.key_token_weights(prep.ids, losses(prep.ids), rule, losses)
    info = {"name": "key-tokens", **info}
    hooks.message(obj.describe(info))
    return weights, info


@dataclass
class Resumed:
    """The steps a checkpoint holds, split at the target."""

    done: list[Step] = field(default_factory=list)  # on the path to this target: read off, not searched again
    later: list[Step] = field(default_factory=list)  # past it: kept in the checkpoint for a later, smaller target


def resume_steps(run_dir: Path, saved: dict | None, fp: dict, num_full: int, hooks: Hooks) -> Resumed:
    """What a resumed run starts from. F-sets are nested, so a run resumed with a larger target just reads its
    answer off the path; the steps past it stay in the checkpoint for a later, smaller target."""
    if saved is None:
        return Resumed()
    check_fingerprint(run_dir, saved["fingerprint"], fp)
    done = [s for s in saved["steps"] if s.pattern.count(FULL) >= num_full]
    hooks.message(f"resuming after step {len(done)}")
    return Resumed(done, saved["steps"][len(done):])


@dataclass
class SearchResult:
    """What the search found and what it cost this session, everything the layer map reports of it."""

    start: str
    num_full: int  # the target
    start_score: Score
    steps: list[Step]  # the whole path: the resumed steps first
    resumed: int  # how many of `steps` were read from the checkpoint
    final: str
    all_full_loss: float
    final_score: Score
    layer_overlap: dict
    uniform: dict  # "1/N" -> uniform interleaving scored on the same tokens
    work: dict  # this session's counters, summed over processes (with `seconds`)


def expected_forwards(opts: Options, prep: Prepared, full_now: int, num_full: int) -> int:
    """Decoder-layer forwards the search typically takes from `full_now` Full layers to `num_full`, as the dry
    run estimates them: the work from all-Full to the target, less the work to where the search starts."""
    layout, samples = prep.layout, len(prep.ids)
    tolerance = opts.race().tolerance if opts.search == "race" else None

    def to(k: int) -> int:
        w = dryrun.search_work(layout.num_layers, layout.fixed_shared, k, opts.search, samples, layout.positions, tolerance)
        return w.get("layer_forwards", w.get("layer_forwards_typical"))

    return max(1, to(num_full) - (to(full_now) if full_now < layout.num_positions else 0))


def run_search(opts: Options, hooks: Hooks, prep: Prepared, run: RunPlan, fp: dict, resumed: Resumed,
               cache_device: str, world) -> SearchResult:
    """The greedy search from `run.start` to `run.num_full` Full layers after the resumed steps, with a
    checkpoint after every step, then the scores the layer map reports (all-Full, final, uniform)."""
    layout, num_full, start, run_dir = prep.layout, run.num_full, run.start, run.run_dir
    done, later = resumed.done, resumed.later
    runner = make_runner(prep, opts, cache_device)
    runner.on_sequences = hooks.sequences
    evaluator = ParallelEvaluator(runner, world)
    baseline: list[Score] = []

    def checkpoint(steps: list[Step]) -> None:
        if not world.is_main:
            return
        steps = steps + later[len(steps) - len(done):]
        art.write_json(run_dir / art.CHECKPOINT, {
            "fingerprint": fp, "baseline_loss": baseline[0].loss if baseline else None, "objective": prep.objective,
            "steps": [s.to_json() for s in steps],
        })
        art.write_trace(run_dir / art.TRACE, baseline[0].loss, steps, layout.positions)

    all_steps = list(done)
    under_way_at = all_steps[-1].pattern if all_steps else start
    record = art.StepRecord(run_dir / art.IN_FLIGHT, under_way_at, art.StepRecord.read(run_dir / art.IN_FLIGHT)
                            if opts.resume else None, world.is_main)
    if record.replay:
        hooks.message(f"resuming step {len(done) + 1} with {plural(len(record.replay), 'saved score')}")

    expected = expected_forwards(opts, prep, start.count(FULL) - len(done), num_full)

    def on_step(step: Step) -> None:
        all_steps.append(step)
        checkpoint(all_steps)
        record.next_step(step.pattern)
        hooks.work(runner.counters.layer_forwards, expected)
        hooks.step(step)

    under_way: list = []  # the (step, candidates done, of) the search last reported

    def on_candidate(step_no: int, done_now: int, total: int) -> None:
        under_way[:] = [step_no, done_now, total]
        hooks.candidate(step_no, done_now, total)

    class _Observed:
        """Passes the baseline score to the checkpoint as soon as it is known, and keeps every score of the
        step under way in `record` (answering from it on resume)."""

        parallel = world.size

        def set_base(self, pattern):
            score = evaluator.set_base(pattern)
            if not baseline:
                baseline.append(score)
            return score

        num_batches, batch_size = runner.num_batches, runner.batch_size

        def rebase(self, pattern):
            evaluator.rebase(pattern)

        def base_losses(self, batches):
            key = ["base", list(batches)]
            saved = record.answer(key)
            if saved is not None:
                return saved
            losses = evaluator.base_losses(batches)
            record.add(key, losses)
            return losses

        def score(self, pattern, batches=None):
            return self.score_many([pattern], batches)[0]

        def _scored(self, patterns, batches):
            key = ["score", list(patterns), None if batches is None else list(batches)]
            saved = record.answer(key)
            if saved is not None:
                return [Score(**sc) for sc in saved]
            scores = evaluator.score_many(patterns, batches)
            record.add(key, [asdict(sc) for sc in scores])
            return scores

        def score_many(self, patterns, batches=None):
            if world.size > 1 or len(patterns) < 2:
                return self._scored(patterns, batches)
            # One process scores one pattern after another anyway: say so after each, not once at the end.
            scores = []
            for p in patterns:
                scores += self._scored([p], batches)
                if under_way:
                    step_no, done_before, total = under_way
                    hooks.candidate(step_no, min(done_before + len(scores), total), total)
            return scores

    remaining = max(0, start.count(FULL) - num_full - len(done))
    hooks.search_started(remaining, len(start) - len(layout.fixed_shared) - 1)
    family, positions, n = layout.family, layout.positions, layout.num_positions
    # The end points a user reads, scored on every sequence by every search: the target, and the ratios
    # uniform interleaving is scored at.
    ratios = {uniform_pattern(n, every, layout.fixed_shared).count(FULL) for every in UNIFORM_EVERY}
    try:
        start_score, steps = greedy_search(
            start, num_full, _Observed(), layout.fixed_shared, opts.search, done=done,
            on_step=on_step, on_candidate=on_candidate, allowed=lambda p: family.runs(p, positions) is None,
            race=opts.race() if opts.search == "race" else None, whole_at=frozenset(ratios | {num_full}),
        )
        record.next_step("")
        final = steps[-1].pattern if steps else start
        if final.count(FULL) > num_full:
            hooks.warn(f"no layer can be shared below {plural(final.count(FULL), 'full layer')} on {family.name} "
                       f"({family.note or 'the library cannot run such patterns'}); the layer map stops there")
        all_full = all_full_pattern(prep.checkpoint)
        all_full_loss = start_score.loss if start == all_full else runner.score(all_full).loss
        final_score = runner.set_base(final)
        layer_overlap = runner.last_layer_overlap
        # Uniform interleaving at the paper's ratios, scored on the same tokens: the baseline a
        # searched pattern has to beat.
        baselines = uniform_baselines(n, layout.fixed_shared, num_full, lambda p: family.runs(p, positions))
        uniform = {ratio: {"pattern": pattern, "num_full": pattern.count(FULL), "loss": runner.score(pattern).loss}
                   for ratio, pattern in baselines.items()}
    finally:
        runner.close()
    checkpoint(steps)
    return SearchResult(start, num_full, start_score, steps, len(done), final, all_full_loss, final_score, layer_overlap,
                        uniform, sum_counters(runner.counters.as_dict()))


def provenance(opts: Options, prep: Prepared, config_sha: str | None) -> dict:
    """Where the layer map comes from: model, data, tokens, settings and library versions."""
    return {
        "model": opts.model,
        "model_location": prep.source.location,  # the directory or hub id an alias resolved to
        "architecture": type(prep.model).__name__,
        "model_type": prep.model.config.model_type,
        "revision": mdl.revision(prep.source),
        "config_sha256": config_sha,
        "index_topk": prep.layout.budget,
        "self_check": prep.self_check,
        "data": opts.data,
        "data_sha256": prep.data_sha256,
        "text_field": opts.text_field,
        "tokens_sha256": tokens_sha256(prep.ids),
        "tokens_file": art.TOKENS,
        "seq_len": opts.seq_len,
        "num_samples": int(prep.ids.shape[0]),
        "num_samples_requested": opts.num_samples,
        "seed": opts.seed,
        "batch_size": opts.batch_size,
        "dtype": opts.dtype,
        "measure_overlap": opts.overlap,
        "device_map": mdl.device_map_of(prep.model),
        "versions": versions(),
    }


def build_layer_map(opts: Options, layout, result: SearchResult, provenance: dict, environment: dict,
                    composite: bool, objective: dict | None = None) -> dict:
    """The layer map: a function of the search result, the model's layout, the options, the provenance and
    the session's environment (wall time, processes, cache device, host), reading nothing else."""
    family, positions, final, steps = layout.family, layout.positions, result.final, result.steps
    work = dict(result.work)
    seconds = work.pop("seconds")
    return {
        "schema": art.SCHEMA,
        "family": family.name,
        "selection": family.selection.kind,
        "pattern": final,
        "positions": positions,
        "num_layers": layout.num_layers,
        "num_full": final.count(FULL),
        "full_layers": full_layers(final, positions),
        "fixed_shared_layers": sorted(positions[p] for p in layout.fixed_shared),
        "indexer_types": indexer_types(final, positions, layout.num_layers),
        "source_layers": source_layers(final, positions),
        "layer_overlap": {str(k): v for k, v in result.layer_overlap.items()},
        "target": {"spec": opts.target, "num_full": result.num_full},
        # What `loss` and `path` score: every token (lm), key tokens or probe answers, and what rebuilds them.
        "objective": objective or {"name": "lm"},
        "loss": {
            "all_full": result.all_full_loss,
            "start": result.start_score.loss,
            "final": result.final_score.loss,
            "delta": result.final_score.loss - result.all_full_loss,
        },
        "path": path(result.start, result.start_score.loss, steps, positions),
        "uniform": result.uniform,
        "engines": engine_args(family, final, positions, layout.num_layers),
        "consumers": consumer_keys(family, final, positions, layout.num_layers, composite),
        "search": {
            "strategy": opts.search,
            "start_pattern": result.start,
            "steps": len(steps),
            "candidates_scored": sum(len(s.scores) for s in steps),
            "full_sweeps": sum(s.swept for s in steps),
            # Sequences scored, summed over candidates: fewer than candidates x sequences where a race dropped some.
            "candidate_sequences": sum(len(sc.seq_losses) for s in steps for sc in s.scores.values()),
            "decided_se": DECIDED_SE,
            "undecided_steps": [s.step for s in steps if not s.confidence.decided],
            **(race_section(opts, steps, positions) if opts.search == "race" else {}),
        },
        "provenance": provenance,
        # This session only: `search` above is the whole search, the steps of earlier sessions included.
        "environment": {
            "wall_seconds": environment["wall_seconds"],
            "search_seconds": round(seconds, 3),
            "resumed_steps": result.resumed,
            "session": session_summary(steps, result.resumed),
            "processes": environment["processes"],
            "cache_device": environment["cache_device"],
            # Work done by this session: a resumed run does less, so it lives here, not in `search`.
            "work": work,
            "host_platform": environment["host_platform"],
        },
    }
