"""What `dsa-convert` and `distill` share around the warm-up math: training windows, the resumable loop
with its checkpoint, the output directory, and a checkpoint writer that copies every tensor of the source
files as it is and adds, replaces or drops only indexer tensors. No typer here."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from indexcache_calib import artifact as art
from indexcache_calib import data as dat
from indexcache_calib.calibrate import check_seq_len_floor
from indexcache_calib.data import file_sha256, tokens_sha256
from indexcache_calib.errors import EXIT_OUT_OF_MEMORY, EXIT_RESUME_MISMATCH, CalibError, Terminated, check_resume_overwrite
from indexcache_calib.families import BY_MODEL_TYPE
from indexcache_calib.model import config_sha256
from indexcache_calib.training.warmup import IndexerOptimizer, freeze_all_but, indexer_param_names, indexer_step, lr_at

# transformers is imported inside the functions that use it: it imports huggingface_hub, which reads
# HF_HUB_OFFLINE once, when imported, and the commands set it (cli_common._quiet_libraries) after importing
# this module; see the note at the top of convert.py.

STATE_DIR = ".indexcache-train"  # inside --out while training; removed once the model is written
STATE = "state.safetensors"
LOG_CSV = "train_log.csv"
TRAINING_LOG = "training_log.json"
CARD = "MODEL_CARD.md"
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
NOT_COPIED = {"config.json", "README.md", CARD, TRAINING_LOG, LOG_CSV}


# ----------------------------------------------------------------------------- data

def training_windows(data: str, tokenizer, seq_len: int, text_field: str = "text", warn=lambda t: None) -> torch.Tensor:
    """Every non-overlapping window of `seq_len` tokens of the documents joined with EOS: [n, seq_len]."""
    docs = dat.read_documents(data, tokenizer, text_field)
    for note in docs.skipped:
        warn(f"{data}: skipped {note}")
    for note in docs.notes:
        warn(f"{data}: {note}")
    ids, available = dat.pack(docs.texts, tokenizer, seq_len, 1 << 62, 0)
    return ids


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=gen).tolist())


def batch_at(windows: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch of training step `step`: a fixed function of (step, seed), so a resumed run sees what an
    uninterrupted one would. Each epoch is a seeded permutation of the windows."""
    n = len(windows)
    rows = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n)
        rows.append(_epoch_order(n, seed, epoch)[pos])
    return windows[rows]


# ----------------------------------------------------------------------------- output directory

def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _bare_state_dir(out: Path) -> bool:
    """--out holds only the state directory, with no state in it: what a run killed before its first
    checkpoint leaves (no `finally` runs on SIGKILL). Nothing there is anyone's, nor worth resuming."""
    return [p.name for p in out.iterdir()] == [STATE_DIR] and not (out / STATE_DIR / STATE).is_file()


def check_out(out: Path, source: Path | None, resume: bool, overwrite: bool) -> None:
    """Refuse an --out that would clobber something; changes nothing."""
    check_resume_overwrite(resume, overwrite)
    if out.exists() and not out.is_dir():
        raise CalibError(f"--out {out} exists and is not a directory")
    if source is not None:
        o, s = out.resolve(), source.resolve()
        if o == s or s in o.parents or o in s.parents:
            raise CalibError(f"--out {out} overlaps the source checkpoint {source}", hint="choose a separate directory")
    if not out.is_dir() or not any(out.iterdir()) or _bare_state_dir(out):
        return
    has_state = (out / STATE_DIR / STATE).is_file()
    if overwrite:
        if not (is_model_dir(out) and (out / TRAINING_LOG).is_file()) and not has_state:
            raise CalibError(f"--out {out} holds files this tool did not write; --overwrite only replaces its own output",
                             hint="choose another --out")
        return
    if has_state and resume:
        return
    if has_state:
        raise CalibError(f"{out} holds an unfinished training run",
                         hint="pass --resume to continue it, --overwrite to start again, or choose another --out")
    if is_model_dir(out) and (out / TRAINING_LOG).is_file():
        raise CalibError(f"{out} already holds a finished result of this command",
                         hint="pass --overwrite to train again, or choose another --out")
    raise CalibError(f"--out {out} is not empty", hint="pass --overwrite to replace an earlier result, or choose another --out")


def prepare_out(out: Path, resume: bool, overwrite: bool) -> Path:
    """Create --out (after `check_out`) and its state directory; returns the state directory."""
    if overwrite and out.is_dir() and not resume:
        shutil.rmtree(out)
    try:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CalibError(f"cannot write to output directory {out}: {e.strerror or e}")
    return out / STATE_DIR


@contextmanager
def output_dir(out: Path, resume: bool, overwrite: bool):
    """Create --out (after `check_out`) for the body, which gets the state directory; out of memory becomes
    one line, and a directory this run created is removed unless it holds a state or a finished model."""
    existed = out.exists() and not (out.is_dir() and _bare_state_dir(out))
    state_dir = prepare_out(out, resume, overwrite)
    try:
        yield state_dir
    except (torch.OutOfMemoryError, MemoryError):
        raise CalibError("out of memory", hint="lower --seq-len or --batch-size, or use a device with more memory",
                         exit_code=EXIT_OUT_OF_MEMORY) from None
    finally:
        if not existed and not (state_dir / STATE).is_file() and not is_model_dir(out):
            shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------- before the weights load

def check_numbers(opts, seq_len: int, topk: int, config) -> None:
    """The options' numbers, and --seq-len against the floor of `config`'s family (calibrate's own check);
    `topk` is the floor only for a config outside the registry of families."""
    for name in ("steps", "batch_size", "checkpoint_every", "eval_samples"):
        if getattr(opts, name) < 1:
            raise CalibError(f"--{name.replace('_', '-')} must be at least 1")
    if not opts.lr > 0:
        raise CalibError("--lr must be positive")
    family = BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    floor, words = (family.seq_len_floor(config), family.budget_words(config)) if family else (topk, f"index_topk {topk}")
    check_seq_len_floor(seq_len, floor, words, "the indexer's choice would never matter",
                        getattr(config, "max_position_embeddings", None),
                        hint_more=", or a smaller --index-topk" if hasattr(opts, "index_topk") else "")


def prepare_training(command: str, opts, source, src_dir: Path, seq_len: int, warn, **fingerprint_extra):
    """Everything cheap, before any weights load: --out checked, the tokenizer, the training and held-out
    windows, the settings, and the fingerprint (checked against the saved state on --resume).
    Returns (out, windows, eval_ids or None, settings, fingerprint)."""
    from transformers import AutoTokenizer  # deferred: see HF_HUB_OFFLINE at the top

    out = Path(opts.out).expanduser()
    check_out(out, src_dir, opts.resume, opts.overwrite)
    source_weight_files(src_dir)  # safetensors present
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CalibError(f"cannot load the tokenizer of {opts.model}: {str(e).splitlines()[0]}")
    windows = training_windows(opts.data, tokenizer, seq_len, opts.text_field, warn)
    eval_ids = None
    if opts.eval_data:
        eval_ids = training_windows(opts.eval_data, tokenizer, seq_len, opts.text_field, warn)[: opts.eval_samples]
    settings = Settings(opts.steps, opts.batch_size, seq_len, opts.lr, opts.seed, opts.checkpoint_every)
    fingerprint = {
        "command": command, "source_config_sha256": config_sha256(source), "source_weights": weights_fingerprint(src_dir),
        "data_sha256": file_sha256(opts.data), "tokens_sha256": tokens_sha256(windows),
        "settings": {k: v for k, v in settings_dict(settings).items() if k != "checkpoint_every"}, "dtype": opts.dtype,
        **fingerprint_extra,
    }
    if opts.resume:
        check_resume(out, fingerprint)
    return out, windows, eval_ids, settings, fingerprint


# ----------------------------------------------------------------------------- the loop

@dataclass
class Settings:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    seed: int
    checkpoint_every: int = 50


@dataclass
class Hooks:
    # Not calibrate.Hooks: training reports optimizer steps (a row of loss, lr, tokens/s) from a known total,
    # a search reports greedy steps, their candidates and a forward's sequences; only `message` is shared.
    message: Callable[[str], None] = lambda text: None
    started: Callable[[int, int], None] = lambda total, done: None
    step: Callable[[dict], None] = lambda row: None


class Interrupted(Exception):
    def __init__(self, saved_step: int, terminated: bool):
        super().__init__(f"interrupted; training state saved at step {saved_step}")
        self.saved_step = saved_step
        self.terminated = terminated


@dataclass
class Trained:
    log: list[dict]
    steps_done: int
    skipped: int
    resumed_from: int
    wall_s: float
    tokens: int
    per_layer_last: dict = field(default_factory=dict)
    batched_scores_max_diff: float | None = None


def check_resume(out: Path, fingerprint: dict) -> None:
    """Before anything is loaded: --resume needs a saved state made from the same inputs and settings."""
    path = out / STATE_DIR / STATE
    if not path.is_file():
        raise CalibError(f"nothing to resume: {path} does not exist", hint="run without --resume to start")
    load_state(path.parent, fingerprint, tensors=False)


def load_state(state_dir: Path, fingerprint: dict, tensors: bool = True) -> tuple[dict, dict] | None:
    """(tensors, metadata) of a saved training state, refusing one made from other inputs or settings."""
    path = state_dir / STATE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
        saved = json.loads(meta["fingerprint"])
        info = {"step": int(meta["step"]), "skipped": int(meta["skipped"]), "log": json.loads(meta["log"]),
                "wall_s": float(meta.get("wall_s", 0.0))}
    except (OSError, KeyError, ValueError) as e:
        raise CalibError(f"cannot read the training state {path}: {e}", hint="start again with --overwrite")
    diff = art.changed_settings(saved, fingerprint)
    if diff:
        raise CalibError(f"--resume refused: the run in {state_dir.parent} was started with other inputs or settings "
                         f"({', '.join(diff)})", hint="rerun with the original options, or --overwrite to start again",
                         exit_code=EXIT_RESUME_MISMATCH)
    return tensors, info


def save_state(state_dir: Path, opt: IndexerOptimizer, fingerprint: dict, step: int, log: list[dict], wall_s: float) -> None:
    meta = {"fingerprint": json.dumps(fingerprint, sort_keys=True), "step": str(step), "skipped": str(opt.skipped),
            "log": json.dumps(log), "wall_s": f"{wall_s:.3f}"}
    art.atomic_write(state_dir / STATE, save(opt.state_tensors(), metadata=meta))
    write_log_csv(state_dir.parent / LOG_CSV, log)


def write_log_csv(path: Path, log: list[dict]) -> None:
    cols = ["step", "loss", "lr", "grad_norm", "applied", "tokens_per_s"]
    lines = [",".join(cols)] + [",".join(_csv(row.get(c)) for c in cols) for row in log]
    art.atomic_write(path, "\n".join(lines) + "\n")


def _csv(v) -> str:
    if isinstance(v, float):
        return f"{v:.9g}"
    return "" if v is None else str(v)


def train(model, groups: dict[int, list[int]], windows: torch.Tensor, settings: Settings, state_dir: Path,
          fingerprint: dict, resume: bool, hooks: Hooks = Hooks()) -> Trained:
    """Train the indexers of the Full layers in `groups` (Full layer -> served layers), everything else
    frozen, for `settings.steps` optimizer steps; checkpoint every `checkpoint_every` steps and when
    interrupted between steps. A resumed run continues from the saved step with the saved optimizer state
    and sees the same batches, so it ends where an uninterrupted run ends."""
    params = indexer_param_names(model, groups.keys())
    if len(params) == 0:
        raise CalibError("the model has no indexer parameters to train in the chosen Full layers")
    freeze_all_but(model, params)
    model.eval()
    opt = IndexerOptimizer(params, settings.lr)
    start, log, wall_before = 0, [], 0.0
    loaded = load_state(state_dir, fingerprint) if resume else None
    if loaded is not None:
        tensors, info = loaded
        opt.load_state_tensors(tensors)
        opt.skipped = info["skipped"]
        start, log, wall_before = info["step"], info["log"], info["wall_s"]
        hooks.message(f"resuming at step {start} of {settings.steps}")
    hooks.started(settings.steps, start)
    t0 = time.time()
    step, saved, updating = start, start, False
    per_layer: dict = {}
    checked = None
    try:
        while step < settings.steps:
            t_step = time.time()
            x = batch_at(windows, step, settings.batch_size, settings.seed)
            opt.zero_grad()
            res = indexer_step(model, x, groups, verify=checked is None)
            if checked is None:
                checked = 0.0  # indexer_step refused otherwise
            lr = lr_at(step, settings.steps, settings.lr)
            updating = True
            applied, gnorm = opt.step(res.loss, lr)
            step += 1
            updating = False
            per_layer = res.layers
            row = {"step": step, "loss": res.loss, "lr": lr, "grad_norm": gnorm if math.isfinite(gnorm) else None,
                   "applied": int(applied), "tokens_per_s": round(x.numel() / max(time.time() - t_step, 1e-9), 1)}
            log.append(row)
            hooks.step(row)
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                save_state(state_dir, opt, fingerprint, step, log, wall_before + time.time() - t0)
                saved = step
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, Terminated)):
            if not updating and step > saved:
                save_state(state_dir, opt, fingerprint, step, log, wall_before + time.time() - t0)
                saved = step
            raise Interrupted(saved, isinstance(e, Terminated)) from None
        raise
    finally:
        model.requires_grad_(False)
    done_now = step - start
    return Trained(log=log, steps_done=step, skipped=opt.skipped, resumed_from=start,
                   wall_s=round(wall_before + time.time() - t0, 1),
                   tokens=step * settings.batch_size * settings.seq_len, per_layer_last=per_layer,
                   batched_scores_max_diff=None if done_now == 0 else checked)


# ----------------------------------------------------------------------------- writing the checkpoint

def source_weight_files(directory: Path) -> tuple[dict[str, str], dict]:
    """(tensor name -> file name, index metadata) of a safetensors checkpoint."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        return dict(data["weight_map"]), data.get("metadata", {})
    single = directory / "model.safetensors"
    if not single.is_file():
        raise CalibError(f"{directory} has no model.safetensors (or safetensors index)",
                         hint="this command reads and writes safetensors checkpoints only")
    with safe_open(str(single), framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}, {}


def source_dtype(directory: Path) -> torch.dtype | None:
    """The floating dtype most of the checkpoint's tensors are stored in (read from the file headers)."""
    weight_map, _ = source_weight_files(directory)
    counts: Counter = Counter()
    for fname in sorted(set(weight_map.values())):
        with safe_open(str(directory / fname), framework="pt") as f:
            for k in f.keys():
                counts[f.get_slice(k).get_dtype()] += 1
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    floating = [(n, c) for n, c in counts.most_common() if n in names]
    return names[floating[0][0]] if floating else None


def checkpoint_tensors(model, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained parameters as the checkpoint files name and hold them: transformers' own reversal of the
    renamings (and any conversion) it applied when loading, the same one `save_pretrained` applies."""
    state = {k: v.detach() for k, v in params.items()}
    try:
        from transformers.core_model_loading import revert_weight_conversion  # deferred: see HF_HUB_OFFLINE at the top
    except ImportError:  # a transformers without load-time conversions saves what it loads
        return state
    return dict(revert_weight_conversion(model, state))


def write_weights(source: Path, out: Path, add: dict[str, torch.Tensor], drop: set[str]) -> dict:
    """Write the checkpoint's tensors to `out`: every source tensor byte for byte under its own name, except
    those in `drop`; tensors in `add` replace or join them (a new one goes to the shard of its layer). The
    file layout follows the source (one file, or the same shards with a new index). Returns a summary."""
    weight_map, index_meta = source_weight_files(source)
    files = sorted(set(weight_map.values()))
    new_map = {k: v for k, v in weight_map.items() if k not in drop}
    for name in add:
        if name in new_map:
            continue
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        same_layer = [f for k, f in weight_map.items() if m and re.search(rf"(?:^|\.)layers\.{m.group(1)}\.", k)]
        new_map[name] = same_layer[0] if same_layer else files[-1]
    total = 0
    for fname in files:
        tensors = {}
        with safe_open(str(source / fname), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                if k in drop:
                    continue
                if k in add:  # a replaced tensor keeps the dtype the file had
                    tensors[k] = add[k].to(f.get_tensor(k).dtype)
                else:
                    tensors[k] = f.get_tensor(k)
        for k, v in add.items():
            if new_map[k] == fname and k not in tensors:
                tensors[k] = v
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        tmp = out / f".{fname}.tmp"
        save_file(tensors, str(tmp), metadata={**meta, "format": meta.get("format", "pt")})
        os.chmod(tmp, 0o666 & ~art._umask())
        tmp.replace(out / fname)
    if len(files) > 1 or (source / "model.safetensors.index.json").is_file():
        index = {"metadata": {**index_meta, "total_size": total}, "weight_map": dict(sorted(new_map.items()))}
        art.atomic_write(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return {"files": files, "tensors": len(new_map), "added": sorted(set(add) - set(weight_map)),
            "replaced": sorted(set(add) & set(weight_map)), "dropped": sorted(drop & set(weight_map)), "bytes": total}


def copy_side_files(source: Path, out: Path) -> list[str]:
    """Tokenizer, generation config and other small files of the source, not its weights, config or card."""
    copied = []
    for p in sorted(source.iterdir()):
        if not p.is_file() or p.name in NOT_COPIED or p.name.startswith(".") or p.name.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copy2(p, out / p.name)
        copied.append(p.name)
    return copied


def weights_fingerprint(source: Path) -> dict:
    """Names and sizes of the weight files: cheap, and changes when the weights are replaced."""
    return {p.name: p.stat().st_size for p in sorted(source.iterdir()) if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}


def finish(out: Path, log: dict, card: str, config: dict) -> None:
    """Write the record, the card and, last, config.json: a directory with config.json is a complete
    checkpoint. Then drop the training state."""
    art.write_json(out / TRAINING_LOG, log)
    art.atomic_write(out / CARD, card)
    art.atomic_write(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def settings_dict(settings: Settings) -> dict:
    return asdict(settings)
