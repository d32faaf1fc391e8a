"""Everything a run writes: plain JSON, CSV and safetensors, each written to a temp file and renamed."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from indexcache_calib.errors import CalibError
from indexcache_calib.search import Step, paired

SCHEMA = "indexcache.layer_map/2"
# /1 maps had one character per decoder layer and no family: every model then had an indexer in every layer.
READ_SCHEMAS = ("indexcache.layer_map/1", SCHEMA)
LAYER_MAP = "layer_map.json"
TRACE = "search_trace.csv"
TOKENS = "tokens.safetensors"
CHECKPOINT = "checkpoint.json"
IN_FLIGHT = "step_in_flight.json"  # the scores of the step under way, so a resume need not run them again
# The PNGs plots.py draws into a run directory (named here, with every other file a run writes).
LOSS_PLOT = "loss_vs_full.png"
PATTERN_PLOT = "pattern.png"
OVERLAP_PLOT = "overlap.png"
REQUIRED_KEYS = (
    "schema", "pattern", "num_layers", "num_full", "full_layers", "indexer_types", "target", "loss",
    "path", "engines", "provenance", "environment",
)


def dumps(obj) -> str:
    """Deterministic JSON: sorted keys, fixed indentation, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def atomic_write(path: Path, data: bytes | str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj) -> None:
    atomic_write(path, dumps(obj))


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 16 else text[:12] + "..."


def changed_settings(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """What differs between two fingerprints, as sorted dotted keys with old and new values:
    `settings.lr (0.001 -> 0.01)`."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({_short(a)} -> {_short(b)})")
    return out


def default_run_name(model_spec: str, data_path: str, target_label: str) -> str:
    model = Path(model_spec.rstrip("/")).name or model_spec
    data = Path(data_path).stem
    raw = f"{model}_{data}_{target_label}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-")


def has_results(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / n).exists() for n in (LAYER_MAP, CHECKPOINT, TRACE))


_has_results = has_results


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a directory that holds results; changes nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CalibError(f"--out {run_dir} exists and is not a directory")
    if _has_results(run_dir) and not (resume or overwrite):
        raise CalibError(
            f"{run_dir} already holds a calibration run",
            hint="pass --resume to continue it, --overwrite to start again, or choose another --out",
        )


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run directory (after `check_run_dir`), clearing old results on --overwrite."""
    check_run_dir(run_dir, resume, overwrite)
    has_results = _has_results(run_dir)
    if has_results and overwrite and not resume:
        # Only what a run writes: anything else in the directory is the user's and stays.
        for name in (LAYER_MAP, CHECKPOINT, IN_FLIGHT, TRACE, TOKENS, LOSS_PLOT, PATTERN_PLOT):
            (run_dir / name).unlink(missing_ok=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise CalibError(f"cannot write to output directory {run_dir}: {e.strerror or e}")


WEIGHTS = "token_weights"  # beside input_ids where the objective weighs tokens: [sequences, seq_len - 1]


def save_tokens(path: Path, ids: torch.Tensor, metadata: dict, weights: torch.Tensor | None = None) -> None:
    tensors = {"input_ids": ids.contiguous()}
    if weights is not None:
        tensors[WEIGHTS] = weights.float().contiguous()
    atomic_write(path, save(tensors, metadata={k: str(v) for k, v in metadata.items()}))


def load_tokens(path: Path) -> torch.Tensor:
    return load_file(str(path))["input_ids"]


def load_token_weights(path: Path) -> torch.Tensor | None:
    """The objective's token weights saved with a run's tokens; None for the LM objective."""
    return load_file(str(path)).get(WEIGHTS)


TRACE_COLUMNS = [
    "step", "num_full_after", "candidate", "loss", "delta_vs_all_full", "delta_vs_step_base", "mean_overlap",
    "sequences", "gap_vs_chosen", "gap_se", "chosen", "runner_up", "decided", "swept",
]


def trace_rows(baseline_loss: float, steps: list[Step], positions: list[int] | None = None) -> list[dict]:
    """One row per (step, candidate), the candidate named by its decoder layer (`positions` maps pattern
    positions to decoder layers; default: the same). `sequences` is how many calibration sequences scored
    the candidate (fewer than all where a race dropped it); `gap_vs_chosen` is its loss minus the chosen candidate's,
    paired over the sequences both were scored on, with its standard error `gap_se`; `runner_up` marks
    the candidate the choice beats by the fewest standard errors, and `decided` whether it beats it by
    at least two."""
    rows = []
    for s in steps:
        conf = s.confidence
        chosen = s.scores[s.chosen]
        for layer, sc in sorted(s.scores.items()):
            gap, se = (None, None) if layer == s.chosen else paired(sc, chosen)
            rows.append({
                "step": s.step,
                "num_full_after": s.pattern.count("F"),
                "candidate": layer if positions is None else positions[layer],
                "loss": sc.loss,
                "delta_vs_all_full": sc.loss - baseline_loss,
                "delta_vs_step_base": s.delta(layer),
                "mean_overlap": sc.overlap,
                "sequences": len(sc.seq_losses),
                "gap_vs_chosen": gap,
                "gap_se": se,
                "chosen": layer == s.chosen,
                "runner_up": layer == conf.runner_up,
                "decided": conf.decided,
                "swept": s.swept,
            })
    return rows


def write_trace(path: Path, baseline_loss: float, steps: list[Step], positions: list[int] | None = None) -> None:
    import pandas as pd  # deferred: slow import (~0.3 s) only a trace needs; the deploy commands import this module

    frame = pd.DataFrame(trace_rows(baseline_loss, steps, positions), columns=TRACE_COLUMNS)
    atomic_write(path, frame.to_csv(index=False, float_format="%.9g", lineterminator="\n"))


def read_layer_map(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CalibError(f"cannot read layer map {path}: {e.strerror or e}")
    except ValueError as e:
        raise CalibError(f"{path} is not valid JSON: {e}")
    if not isinstance(data, dict) or data.get("schema") not in READ_SCHEMAS:
        raise CalibError(f"{path} is not an indexcache layer map (schema {SCHEMA})")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CalibError(f"{path} is missing {', '.join(missing)}")
    return data


class StepRecord:
    """What the step under way has scored, written after every answer (by the process that writes the
    run): a run stopped mid-step resumes without scoring any of it again. The search asks for the same
    scores in the same order on resume (it decides only from scores), so the saved answers are replayed
    in order, as long as each matches what is asked; the first that does not ends the replay."""

    def __init__(self, path: Path, base: str, saved: dict | None, write: bool):
        self.path, self.base, self.write = Path(path), base, write
        self.calls: list = []
        self.replay = list(saved["calls"]) if saved and saved.get("base") == base else []

    @staticmethod
    def read(path: Path) -> dict | None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None  # none, or cut short: the step runs whole again
        return data if isinstance(data, dict) and isinstance(data.get("calls"), list) else None

    def answer(self, key: list):
        """The saved answer to `key`, or None (and no more replay)."""
        if self.replay and self.replay[0].get("key") == key:
            call = self.replay.pop(0)
            self.calls.append(call)
            return call["answer"]
        self.replay = []
        return None

    def add(self, key: list, answer) -> None:
        self.calls.append({"key": key, "answer": answer})
        if self.write:
            write_json(self.path, {"base": self.base, "calls": self.calls})

    def next_step(self, base: str) -> None:
        self.base, self.calls, self.replay = base, [], []
        if self.write:
            self.path.unlink(missing_ok=True)


def remove_partial(run_dir: Path) -> None:
    """Leave no half-written temp files behind after a failure."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def first_missing(path: Path) -> Path | None:
    """The outermost directory that creating `path` (with its parents) makes; None if `path` exists."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return None
    top = path
    for parent in path.parents:
        if parent.exists():
            break
        top = parent
    return top


def remove_empty_dirs(path: Path, made: Path | None) -> None:
    """Undo what creating `path` made (`made`, from `first_missing`) as far as it is still empty: a run
    that failed on bad input leaves no empty `outputs/` behind."""
    if made is None:
        return
    for d in (Path(path), *Path(path).parents):
        if not d.is_dir() or any(d.iterdir()):
            return
        d.rmdir()
        if d == made:
            return


def rmtree_if_empty(run_dir: Path) -> None:
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
