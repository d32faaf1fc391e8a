"""Handing a pattern to the serving engines: launch arguments, checks against a checkpoint, a model
directory with the pattern in its config.json, and a summary of a layer map. No typer here."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from indexcache_calib import artifact as art
from indexcache_calib import model as mdl
from indexcache_calib.errors import CalibError
from indexcache_calib.pattern import check_pattern, engine_overrides, full_layers, indexer_types, source_layers

ENGINES = ("vllm", "sglang", "transformers", "trtllm")
# Architectures whose engines read the pattern keys, with their model_type.
SUPPORTED = {"GlmMoeDsaForCausalLM": "glm_moe_dsa", "DeepseekV32ForCausalLM": "deepseek_v32"}
# transformers builds shared layers natively only for GLM; DeepseekV32 has no sharing there.
TRANSFORMERS_SHARING = {"GlmMoeDsaForCausalLM", "glm_moe_dsa"}
EXIT_INVALID = 1  # the pattern is wrong; 2 stays "could not read the input"
_INDEXER_WEIGHT = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.indexer\.")


class InvalidPattern(CalibError):
    """Validation found problems; the CLI prints one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__(f"{len(problems)} problem(s): {'; '.join(problems)}", exit_code=EXIT_INVALID)
        self.problems = problems


def overrides_json(pattern: str) -> str:
    return json.dumps(engine_overrides(pattern), separators=(",", ":"))


# -- reading what the user gave ------------------------------------------------------------------


def load_layer_map(arg: str | Path) -> tuple[dict, Path]:
    """A layer map file, or a run directory holding one."""
    path = Path(arg).expanduser()
    if path.is_dir():
        path = path / art.LAYER_MAP
    if not path.exists():
        raise CalibError(f"layer map {path} does not exist", hint="pass the layer_map.json (or the run directory) that calibrate wrote")
    return art.read_layer_map(path), path


@dataclass
class Target:
    pattern: str
    layer_map: dict | None = None
    path: Path | None = None


def read_target(arg: str) -> Target:
    """A layer map file or run directory, else a bare pattern string."""
    if Path(arg).expanduser().exists():
        lm, path = load_layer_map(arg)
        return Target(lm["pattern"] if isinstance(lm["pattern"], str) else "", lm, path)
    text = arg.strip()
    if any(c in text for c in "/\\."):  # a path, not a pattern
        raise CalibError(f"{arg} does not exist", hint="pass a layer_map.json, a run directory, or a pattern such as FSSF...")
    return Target(text)


@dataclass
class ModelInfo:
    spec: str
    directory: Path
    config: dict
    indexer_layers: set[int] | None  # layers with indexer weights; None: no weight files to tell from

    @property
    def num_layers(self) -> int | None:
        n = self.config.get("num_hidden_layers")
        return n if isinstance(n, int) else None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else "?"


def read_model(spec: str) -> ModelInfo:
    """The model's config.json and its weight names; no weights are loaded."""
    source = mdl.resolve(spec)
    path = mdl.config_path(source)
    if path is None:
        if source.is_local:
            raise CalibError(f"{source.location} is not a model directory (no config.json)")
        raise CalibError(f"model {source.location!r} is not in the local Hugging Face cache",
                         hint=f"download it first (hf download {source.location}) or pass a local checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CalibError(f"cannot read {path}: {e}")
    if not isinstance(config, dict):
        raise CalibError(f"{path} is not a JSON object")
    return ModelInfo(spec, path.parent, config, indexer_weight_layers(path.parent))


def indexer_weight_layers(directory: Path) -> set[int] | None:
    """Layer ids with any `layers.{i}.self_attn.indexer.*` tensor, from the safetensors index or the
    file headers."""
    names: list[str] = []
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    try:
        if indexes:
            for index in indexes:
                names += list(json.loads(index.read_text())["weight_map"])
        else:
            from safetensors import safe_open

            files = sorted(directory.glob("*.safetensors"))
            if not files:
                return None
            for f in files:
                with safe_open(str(f), framework="numpy") as handle:
                    names += list(handle.keys())
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same thing to the user
        raise CalibError(f"cannot list the weights in {directory}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return {int(m.group(1)) for n in names if (m := _INDEXER_WEIGHT.search(n))}


# -- validate --------------------------------------------------------------------------------------


@dataclass
class Report:
    pattern: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    num_layers: int | None = None
    architecture: str | None = None

    @property
    def valid(self) -> bool:
        return not self.problems

    def as_json(self) -> dict:
        return {"valid": self.valid, "problems": self.problems, "notes": self.notes, "pattern": self.pattern,
                "num_layers": self.num_layers, "architecture": self.architecture}


def architecture_problem(architectures: list, model_type: str | None, has_topk: bool = True) -> str | None:
    ok_arch = not architectures or any(a in SUPPORTED for a in architectures)
    if ok_arch and model_type in SUPPORTED.values():
        return None
    name = f"architecture {', '.join(architectures) or '?'} (model_type {model_type or '?'})"
    if model_type == "glm4_moe_lite" or not has_topk:
        return f"{name} is not a DSA model: it has no lightning indexer, so there is nothing to share"
    supported = ", ".join(f"{a} ({t})" for a, t in SUPPORTED.items())
    return f"{name} is not one the engines share indexers for: they support {supported}"


def layer_map_problems(lm: dict) -> list[str]:
    """Whether a layer map agrees with itself: everything derived from `pattern` must match it."""
    pattern = lm["pattern"]
    if not isinstance(pattern, str):
        return ["the layer map's pattern is not a string"]
    problems = []
    if lm.get("num_layers") != len(pattern):
        problems.append(f"the layer map records num_layers {lm.get('num_layers')} but its pattern has {len(pattern)} layers")
    types = lm.get("indexer_types")
    if types != indexer_types(pattern):
        differ = [i for i, (a, b) in enumerate(zip(types or [], indexer_types(pattern))) if a != b]
        where = f"at layers {differ}" if differ and len(types) == len(pattern) else f"({len(types or [])} entries for {len(pattern)} layers)"
        problems.append(f"the layer map's indexer_types disagree with its pattern {where}")
    if lm.get("full_layers") != full_layers(pattern) or lm.get("num_full") != pattern.count("F"):
        problems.append("the layer map's full_layers / num_full disagree with its pattern")
    expected = engine_overrides(pattern)
    for engine, entry in sorted((lm.get("engines") or {}).items()):
        try:
            value = json.loads(entry["value"])
        except (TypeError, KeyError, ValueError):
            problems.append(f"the layer map's {engine} overrides are not a JSON object")
            continue
        if not isinstance(value, dict) or any(value.get(k) != v for k, v in expected.items()):
            problems.append(f"the layer map's {engine} overrides disagree with its pattern (they must set index_topk_pattern and indexer_types to it)")
        elif entry.get("args") is not None and entry["value"] not in entry["args"]:
            problems.append(f"the layer map's {engine} launch arguments do not carry its overrides")
    return problems


def validate(target: Target, model: ModelInfo | None) -> Report:
    """Every problem with the pattern, for the model if one is given (else for what the layer map records)."""
    pattern, lm = target.pattern, target.layer_map
    report = Report(pattern)
    fixed: set[int] = set(lm.get("fixed_shared_layers") or []) if lm else set()
    if model is not None:
        report.num_layers = model.num_layers
        report.architecture = model.architecture
        cfg = model.config
        arch = architecture_problem(cfg.get("architectures") or [], cfg.get("model_type"), "index_topk" in cfg)
        if model.num_layers is None:
            report.problems.append(f"{model.directory / 'config.json'} has no num_hidden_layers")
        if model.indexer_layers is None:
            report.notes.append(f"no safetensors weights in {model.directory}: which layers ship indexer weights was not checked")
        elif not model.indexer_layers:
            # Most likely weights named another way; flagging every layer would bury the real problems.
            report.notes.append(f"no tensor in {model.directory} is named like layers.N.self_attn.indexer.*: indexer weights not checked")
        elif model.num_layers:
            fixed |= {i for i in range(model.num_layers) if i not in model.indexer_layers}
    elif lm is not None:
        prov = lm.get("provenance") or {}
        report.num_layers = lm.get("num_layers")
        report.architecture = prov.get("architecture")
        arch = architecture_problem([prov["architecture"]] if prov.get("architecture") else [], prov.get("model_type"))
        report.notes.append("checked against what the layer map records; pass --model to check a checkpoint")
    else:
        arch = None
        report.notes.append("length, architecture and indexer weights not checked: pass --model")

    # layer 0 without indexer weights gets its own message: "must be S" would contradict "must be F"
    report.problems += check_pattern(pattern, None, frozenset(fixed - {0}))
    if 0 in fixed:
        report.problems.append("layer 0 has no indexer weights in the checkpoint: no layer can produce top-k indices for shared layers to reuse")
    if model is not None and model.num_layers is not None and len(pattern) != model.num_layers:
        n, got = model.num_layers, len(pattern)
        nextn = model.config.get("num_nextn_predict_layers") or 0
        if nextn and got == n + nextn:
            report.problems.append(
                f"pattern has {got} layers: it counts the model's {nextn} MTP/NextN layer(s) (num_nextn_predict_layers), "
                f"which keep their own indexer and are not part of the pattern; the pattern covers the {n} decoder layers, "
                f"so drop its last {nextn} character(s)")
        elif nextn and got > n:
            report.problems.append(f"pattern has {got} layers, the model has {n} decoder layers (its {nextn} MTP/NextN layer(s) are not part of the pattern)")
        else:
            report.problems.append(f"pattern has {got} layers, the model has {n}")
    if arch:
        report.problems.append(arch)
    if lm is not None:
        report.problems += layer_map_problems(lm)
    return report


# -- export ----------------------------------------------------------------------------------------


def default_model(lm: dict) -> str:
    """What the engine should load: the calibrated model as recorded, with an alias turned into its
    hub id or path (engines do not know this tool's aliases)."""
    prov = lm.get("provenance") or {}
    spec = prov.get("model_location") or prov.get("model") or "MODEL"
    try:
        if spec in mdl.aliases() and not Path(spec).is_dir():
            return mdl.resolve(spec).location
    except CalibError:
        pass
    return spec


def export(lm: dict, engine: str, model: str | None = None) -> dict:
    """Launch arguments for one engine: {'engine', 'model', 'overrides', 'text', 'argv'?}."""
    if engine not in ENGINES:
        raise CalibError(f"unknown --engine {engine!r}", hint=f"use one of {', '.join(ENGINES)}")
    problems = layer_map_problems(lm) + check_pattern(lm["pattern"] if isinstance(lm["pattern"], str) else "")
    if problems:
        raise CalibError(f"the layer map is not consistent: {'; '.join(problems)}", hint="calibrate again, or check it with indexcache validate")
    pattern = lm["pattern"]
    model = model or default_model(lm)
    overrides = overrides_json(pattern)
    result = {"engine": engine, "model": model, "overrides": engine_overrides(pattern)}
    if engine == "vllm":
        result["argv"] = ["vllm", "serve", model, "--hf-overrides", overrides]
    elif engine == "sglang":
        result["argv"] = ["python", "-m", "sglang.launch_server", "--model-path", model, "--json-model-override-args", overrides]
    if "argv" in result:
        result["text"] = shlex.join(result["argv"])
    elif engine == "trtllm":
        result["text"] = overrides
    else:
        prov = lm.get("provenance") or {}
        if not ({prov.get("architecture"), prov.get("model_type")} & TRANSFORMERS_SHARING):
            raise CalibError(
                f"transformers has no indexer sharing for {prov.get('architecture', 'this architecture')}: its from_pretrained rejects indexer_types",
                hint="serve it with --engine vllm or --engine sglang",
            )
        result["text"] = (
            "from transformers import AutoModelForCausalLM\n\n"
            f"# IndexCache: {pattern.count('F')} of {len(pattern)} layers keep their indexer (transformers >= 5.6).\n"
            "# indexer_types, not index_topk_pattern: from_pretrained rejects that keyword, and a config.json\n"
            "# that already carries indexer_types would win over a pattern anyway.\n"
            "model = AutoModelForCausalLM.from_pretrained(\n"
            f"    {json.dumps(model)},\n"
            f"    indexer_types={json.dumps(indexer_types(pattern))},\n"
            ")"
        )
    return result


# -- apply -----------------------------------------------------------------------------------------


@dataclass
class Applied:
    out: Path
    source: Path
    linked: dict  # method -> count: symlink, hardlink, copy
    link_error: str | None  # why symlinks failed, if they did
    transformers_ignores: bool
    notes: list[str]


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_out_dir(out: Path, source: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CalibError(f"--out {out} exists and is not a directory")
    real_out, real_src = out.resolve(), source.resolve()
    if _inside(real_out, real_src):
        raise CalibError(f"--out {out} is inside the model directory {source}", hint="choose an --out outside it")
    if _inside(real_src, real_out):
        raise CalibError(f"--out {out} contains the model directory {source}; replacing it would delete the model", hint="choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CalibError(f"--out {out} already exists and is not empty", hint="pass --overwrite to replace it, or choose another --out")


def _link(src: Path, dst: Path, method: list[str]) -> str:
    """Symlink; where the filesystem refuses, a hard link, else a copy. `method[0]` remembers the
    first that worked, so one refusal does not cost a failed syscall per file."""
    if method[0] == "symlink":
        try:
            os.symlink(src, dst, target_is_directory=src.is_dir())
            return "symlink"
        except OSError as e:
            method[0], method[1] = "hardlink", f"{type(e).__name__}: {e.strerror or e}"
    if method[0] == "hardlink" and not src.is_dir():
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError:
            pass
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst)
    return "copy"


def apply(lm: dict, model: ModelInfo, out: Path, overwrite: bool = False) -> Applied:
    """Write `out` as the model with the pattern in its config.json, every other file linked.
    The directory is built next to `out` and renamed into place, so `out` is never half-written."""
    report = validate(Target(lm["pattern"], lm), model)
    if report.problems:
        raise InvalidPattern(report.problems)
    out = Path(out).expanduser().absolute()
    source = model.directory.absolute()
    check_out_dir(out, source, overwrite)
    pattern = lm["pattern"]
    config = dict(model.config)
    config.update(engine_overrides(pattern))
    entries = sorted(p for p in source.iterdir() if p.name != "config.json" and not p.name.startswith("."))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:
        raise CalibError(f"cannot write to {out.parent}: {e.strerror or e}")
    linked = {"symlink": 0, "hardlink": 0, "copy": 0}
    method = ["symlink", None]
    old = None
    try:
        for src in entries:
            linked[_link(src, tmp / src.name, method)] += 1
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it private
        if out.exists():
            if any(out.iterdir()):  # --overwrite: move the old one aside until the new one is in place
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
                os.replace(out, old / "dir")
            else:
                out.rmdir()
        os.replace(tmp, out)
    except BaseException as e:  # interrupted too: put the old directory back, drop the new one
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old / "dir", out)
        if isinstance(e, OSError):
            raise CalibError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # the replaced --out; rmtree removes links, not their targets
    cfg = model.config
    ignores = not ({model.architecture, cfg.get("model_type")} & TRANSFORMERS_SHARING)
    return Applied(out, source, linked, method[1], ignores, report.notes)


# -- show ------------------------------------------------------------------------------------------


UNDECIDED = "undecided: more calibration sequences would separate these layers"


def margin_note(step: dict, short: bool = False) -> str:
    """'layer 5 over layer 7 by 0.8 SE' (short: '0.8 SE over layer 7') for a path entry that records its
    runner-up."""
    chosen = step.get("chosen", (step.get("flipped") or [None])[0])
    if step.get("runner_up") is None:
        return "the only candidate" if short else f"layer {chosen}, the only candidate"
    gap, se = step.get("gap"), step.get("gap_se")
    if se is None:
        by = f"{gap:+.2g} nats (one sequence: no standard error)"
    elif se == 0:
        by = "a tie" if gap == 0 else f"{gap:.2g} nats on every sequence"
    else:
        by = f"{gap / se:.1f} SE"
    if short:
        return f"{by} over layer {step['runner_up']}"
    return f"layer {chosen} over layer {step['runner_up']} by {by}"


def undecided_line(path_rows: list[dict]) -> str | None:
    """One line naming the steps decided by less than 2 SE, or None when every step was decided."""
    rows = [r for r in path_rows if not r.get("decided", True)]
    if not rows:
        return None
    return f"{UNDECIDED}: " + "; ".join(f"step {r['step']} ({margin_note(r)})" for r in rows)


def summary(lm: dict, path: Path | None = None) -> dict:
    """What `show` draws, as data."""
    pattern = lm["pattern"]
    if not isinstance(pattern, str) or check_pattern(pattern):
        raise CalibError(f"the layer map's pattern {pattern!r} is not a pattern of 'F' and 'S' starting with 'F'")
    sources = source_layers(pattern)
    overlap = lm.get("layer_overlap") or {}
    fixed = set(lm.get("fixed_shared_layers") or [])
    all_full = lm["loss"]["all_full"]
    layers = [
        {"layer": i, "type": c, "reads_from": sources[i], "overlap": overlap.get(str(i)), "no_indexer_weights": i in fixed}
        for i, c in enumerate(pattern)
    ]
    steps, previous = [], None
    for entry in lm.get("path") or []:
        p = entry["pattern"]
        flipped = [i for i, (a, b) in enumerate(zip(previous, p)) if a != b] if previous else []
        steps.append({
            "step": entry.get("step"), "num_full": entry["num_full"], "flipped": flipped,
            "loss": entry["loss"], "delta": entry["loss"] - all_full, "pattern": p,
            # How surely the step's choice beat the runner-up (absent in layer maps written before this was recorded).
            "runner_up": entry.get("runner_up"), "gap": entry.get("gap"), "gap_se": entry.get("gap_se"),
            "decided": entry.get("decided", True),
        })
        previous = p
    searched = {s["num_full"]: s["loss"] for s in steps}
    uniform = [
        {
            "ratio": ratio, "pattern": u["pattern"], "num_full": u["num_full"], "loss": u["loss"], "delta": u["loss"] - all_full,
            "searched_loss_same_num_full": searched.get(u["num_full"]),
        }
        for ratio, u in sorted((lm.get("uniform") or {}).items(), key=lambda kv: -kv[1]["num_full"])
    ]
    undecided = [s for s in steps if not s["decided"]]
    return {
        "layer_map": str(path) if path else None,
        "pattern": pattern,
        "num_layers": len(pattern),
        "num_full": pattern.count("F"),
        "full_layers": full_layers(pattern),
        "loss": lm["loss"],
        "layers": layers,
        "path": steps,
        "uniform": uniform,
        # Steps whose choice beat the runner-up by less than 2 paired standard errors over the calibration
        # sequences: more sequences would separate these layers.
        "undecided_steps": [s["step"] for s in undecided],
        "provenance": lm.get("provenance") or {},
    }
