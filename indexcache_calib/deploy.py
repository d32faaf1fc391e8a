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
from indexcache_calib.errors import EXIT_BAD_INPUT, CalibError, plural
from indexcache_calib.families import BY_MODEL_TYPE
from indexcache_calib.length_curve import LENGTH_CURVE, engine_setting
from indexcache_calib.retrieval import RETRIEVAL
from indexcache_calib.pattern import check_pattern, full_layers, indexer_types, source_layers
from indexcache_calib.search import DECIDED_SE

ENGINES = ("vllm", "sglang", "transformers", "trtllm")
# vLLM's IndexCache docs list it as required; vllm-ascend, ROCm ATOM and prime-rl read a pattern only
# when it is set; engines that do not know it ignore it.
INDEX_CACHE_FLAG = {"use_index_cache": True}
EXIT_INVALID = EXIT_BAD_INPUT  # an invalid pattern is bad input, as everywhere else


class InvalidPattern(CalibError):
    """Validation found problems; the CLI prints one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__(f"{len(problems)} problem(s): {'; '.join(problems)}", exit_code=EXIT_INVALID)
        self.problems = problems


# -- the keys each engine reads ---------------------------------------------------------------------


def lm_family(lm: dict):
    """The adapter a layer map was calibrated with (older maps name only the model_type)."""
    name = lm.get("family") or (lm.get("provenance") or {}).get("model_type")
    return BY_MODEL_TYPE.get(name)


def lm_positions(lm: dict) -> list[int]:
    pattern = lm["pattern"] if isinstance(lm.get("pattern"), str) else ""
    positions = lm.get("positions")
    return list(positions) if isinstance(positions, list) else list(range(len(pattern)))


def engine_keys(family, pattern: str, positions: list[int], num_layers: int, engine: str) -> dict:
    """The config keys `engine` reads, set to `pattern`. Both keys are set because SGLang and
    transformers read `indexer_types` before `index_topk_pattern`, and checkpoints saved by transformers
    already carry `indexer_types`: a bare pattern would be silently ignored there."""
    if family.engine_pattern == "positions":  # one character per indexer layer, in order; no indexer_types
        keys = {"index_topk_pattern": pattern}
    else:
        types = indexer_types(pattern, positions, num_layers)
        keys = {"index_topk_pattern": "".join("F" if t == "full" else "S" for t in types), "indexer_types": types}
    if engine in ("vllm", "sglang"):
        keys.update(INDEX_CACHE_FLAG)
    return keys


def engine_args(family, pattern: str, positions: list[int], num_layers: int) -> dict:
    """Launch arguments for every serving engine that reads this family's pattern (for the layer map)."""
    out = {}
    for engine, flag in (("vllm", "--hf-overrides"), ("sglang", "--json-model-override-args")):
        if engine in family.engines:
            value = json.dumps(engine_keys(family, pattern, positions, num_layers, engine), separators=(",", ":"))
            out[engine] = {"flag": flag, "value": value, "args": f"{flag} '{value}'"}
    return out


def consumer_keys(family, pattern: str, positions: list[int], num_layers: int, composite: bool) -> dict:
    """For each engine or library that reads this family's pattern, the config keys it reads and where."""
    out = {}
    for engine in family.engines:
        if engine == "transformers":
            keys = {family.native_key: indexer_types(pattern, positions, num_layers)}
        else:
            keys = engine_keys(family, pattern, positions, num_layers, engine)
        where = "text_config" if composite and engine == "transformers" else "config"
        out[engine] = {"keys": keys, "config": where}
    return out


def consumers_note(family) -> str:
    readers = [e for e in ENGINES if e in family.engines]
    if not readers:
        return f"no serving engine or library reads an IndexCache pattern for {family.name} yet; the layer map is the artifact"
    return f"engines that read a pattern for {family.name}: {', '.join(readers)}"


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
    config: dict  # config.json as written
    checkpoint: object | None  # model.Checkpoint; None where the config is not a DSA model this tool knows
    problem: str | None = None  # why there is no checkpoint view

    @property
    def num_layers(self) -> int | None:
        if self.checkpoint is not None:
            return self.checkpoint.num_layers
        n = self.config.get("num_hidden_layers", (self.config.get("text_config") or {}).get("num_hidden_layers"))
        return n if isinstance(n, int) else None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else "?"


def read_model(spec: str) -> ModelInfo:
    """The model's config and its weight names; no weights are loaded."""
    source, directory, config = mdl.read_config_json(spec)
    try:
        return ModelInfo(spec, directory, config, mdl.inspect_checkpoint(source))
    except CalibError as e:
        return ModelInfo(spec, directory, config, None, e.message)


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


def layer_map_problems(lm: dict) -> list[str]:
    """Whether a layer map agrees with itself: everything derived from `pattern` must match it."""
    pattern = lm["pattern"]
    if not isinstance(pattern, str):
        return ["the layer map's pattern is not a string"]
    family = lm_family(lm)
    if family is None:
        return [f"the layer map names no model family indexcache knows ({lm.get('family') or (lm.get('provenance') or {}).get('model_type')})"]
    positions = lm_positions(lm)
    problems = []
    num_layers = lm.get("num_layers")
    if len(positions) != len(pattern) or (isinstance(num_layers, int) and positions and max(positions) >= num_layers):
        problems.append(f"the layer map's pattern has {len(pattern)} characters for {len(positions)} positions of {num_layers} layers")
        return problems
    n = num_layers if isinstance(num_layers, int) else len(pattern)
    types = lm.get("indexer_types")
    expected = indexer_types(pattern, positions, n)
    if types != expected:
        differ = [i for i, (a, b) in enumerate(zip(types or [], expected)) if a != b]
        where = f"at layers {differ}" if differ and len(types) == len(expected) else f"({len(types or [])} entries for {len(expected)} layers)"
        problems.append(f"the layer map's indexer_types disagree with its pattern {where}")
    if lm.get("full_layers") != full_layers(pattern, positions) or lm.get("num_full") != pattern.count("F"):
        problems.append("the layer map's full_layers / num_full disagree with its pattern")
    for engine, entry in sorted((lm.get("engines") or {}).items()):
        try:
            value = json.loads(entry["value"])
        except (TypeError, KeyError, ValueError):
            problems.append(f"the layer map's {engine} overrides are not a JSON object")
            continue
        keys = engine_keys(family, pattern, positions, n, engine)
        if not isinstance(value, dict) or any(value.get(k) != v for k, v in keys.items() if k != "use_index_cache"):
            problems.append(f"the layer map's {engine} overrides disagree with its pattern (they must set index_topk_pattern and indexer_types to it)")
        elif entry.get("args") is not None and entry["value"] not in entry["args"]:
            problems.append(f"the layer map's {engine} launch arguments do not carry its overrides")
    return problems


def provenance_problems(lm: dict, model: ModelInfo) -> tuple[list[str], list[str]]:
    """(problems, notes) from comparing what the layer map was calibrated on with `model`."""
    ckpt = model.checkpoint
    prov = lm.get("provenance") or {}
    problems, notes = [], []
    if ckpt is None:
        return problems, notes
    family = lm_family(lm)
    if family is not None and family is not ckpt.family:
        problems.append(f"the layer map was calibrated on a {family.name} model; {model.spec} is {ckpt.family.name}")
    for what, theirs, ours in (
        ("decoder layers", lm.get("num_layers"), ckpt.num_layers),
        ("index_topk", prov.get("index_topk"), ckpt.budget),
    ):
        if theirs is not None and theirs != ours:
            problems.append(f"the layer map was calibrated on a model with {what} {theirs}; {model.spec} has {ours}")
    if lm.get("positions") is not None and list(lm["positions"]) != ckpt.positions and lm.get("num_layers") == ckpt.num_layers:
        problems.append(f"the layer map's indexer layers are {lm['positions']}; {model.spec} has them at {ckpt.positions}")
    # apply's own output differs from the model calibrated on only by the pattern keys it wrote: the same config.
    if mdl.same_config(prov.get("config_sha256"), ckpt.source) is False and not problems:
        notes.append(f"{model.spec}'s config.json differs from the one calibrated on ({prov.get('model')}): "
                     "same layers and index_topk, but the pattern was measured on the other model")
    return problems, notes


def validate(target: Target, model: ModelInfo | None) -> Report:
    """Every problem with the pattern, for the model if one is given (else for what the layer map records)."""
    pattern, lm = target.pattern, target.layer_map
    report = Report(pattern)
    family = lm_family(lm) if lm else None
    positions = lm_positions(lm) if lm else None
    fixed: set[int] = set()
    if lm:
        index = {l: p for p, l in enumerate(positions)}
        fixed = {index[l] for l in lm.get("fixed_shared_layers") or [] if l in index}
    if model is not None:
        report.num_layers = model.num_layers
        report.architecture = model.architecture
        ckpt = model.checkpoint
        if ckpt is None:
            report.problems.append(model.problem)
        else:
            family, positions = ckpt.family, ckpt.positions
            fixed = set(ckpt.fixed_shared)
            if ckpt.indexer_layers is None:
                report.notes.append(f"no safetensors weights in {model.directory}: which layers ship indexer weights was not checked")
            elif not ckpt.indexer_layers:
                report.notes.append(f"no tensor in {model.directory} is named like layers.N.{family.indexer_at}.*: indexer weights not checked")
            if ckpt.config_shared:
                report.notes.append(f"the checkpoint's config already carries a pattern ({len(ckpt.config_shared)} layers marked shared); "
                                    "engines would read this one instead once it is applied")
    elif lm is not None:
        prov = lm.get("provenance") or {}
        report.num_layers = lm.get("num_layers")
        report.architecture = prov.get("architecture")
        if family is None:
            report.problems.append(f"the layer map's model_type {prov.get('model_type')} is not a family indexcache knows")
        report.notes.append("checked against what the layer map records; pass --model to check a checkpoint")
    else:
        report.notes.append("length, architecture and indexer weights not checked: pass --model")

    # layer 0 without indexer weights gets its own message: "must be S" would contradict "must be F"
    report.problems += check_pattern(pattern, None, frozenset(fixed - {0}))
    if 0 in fixed:
        report.problems.append("the first indexer layer has no indexer weights in the checkpoint: no layer can produce top-k indices for shared layers to reuse")
    if model is not None and model.checkpoint is not None and len(pattern) != len(positions):
        report.problems.append(_length_problem(pattern, model))
    elif family is not None and positions is not None and len(pattern) == len(positions) and not check_pattern(pattern):
        why = family.runs(pattern, positions)
        if why:
            report.problems.append(f"{family.name} cannot run this pattern: {why}")
    if lm is not None:
        report.problems += layer_map_problems(lm)
    if lm is not None and model is not None:
        problems, notes = provenance_problems(lm, model)
        report.problems += problems
        report.notes += notes
    if family is not None and model is not None:
        report.notes.append(consumers_note(family))
    return report


def _length_problem(pattern: str, model: ModelInfo) -> str:
    ckpt = model.checkpoint
    n, got, want = ckpt.num_layers, len(pattern), len(ckpt.positions)
    nextn = getattr(ckpt.text, "num_nextn_predict_layers", None) or 0
    if want != n:
        return (f"pattern has {got} characters, the model has {want} layers with an indexer ({n} decoder layers; "
                f"{ckpt.family.note or 'the others have none'}): one character per indexer layer")
    if nextn and got == n + nextn:
        return (f"pattern has {got} layers: it counts the model's {nextn} MTP/NextN layer(s) (num_nextn_predict_layers), "
                f"which keep their own indexer and are not part of the pattern; the pattern covers the {n} decoder layers, "
                f"so drop its last {nextn} character(s)")
    if nextn and got > n:
        return f"pattern has {got} layers, the model has {n} decoder layers (its {nextn} MTP/NextN layer(s) are not part of the pattern)"
    return f"pattern has {got} layers, the model has {n}"


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


def _transformers_snippet(family, lm: dict, model: str, types: list[str]) -> str:
    arch = (lm.get("provenance") or {}).get("architecture") or "AutoModelForCausalLM"
    pattern = lm["pattern"]
    head = (
        f"# IndexCache: {pattern.count('F')} of {len(pattern)} indexer layers keep their indexer (transformers >= 5.6).\n"
        "# indexer_types, not index_topk_pattern: from_pretrained rejects that keyword, and a config.json\n"
        "# that already carries indexer_types would win over a pattern anyway.\n"
    )
    if family.native_keyword:  # from_pretrained passes the key on to the top-level config
        return (
            "from transformers import AutoModelForCausalLM\n\n" + head +
            "model = AutoModelForCausalLM.from_pretrained(\n"
            f"    {json.dumps(model)},\n"
            f"    {family.native_key}={json.dumps(types)},\n"
            ")"
        )
    # Composite models keep the key in their text config, which a keyword would not reach.
    return (
        f"from transformers import AutoConfig, {arch}\n\n" + head +
        f"config = AutoConfig.from_pretrained({json.dumps(model)})\n"
        f"config.get_text_config().{family.native_key} = {json.dumps(types)}\n"
        f"model = {arch}.from_pretrained({json.dumps(model)}, config=config)"
    )


def _alias_problems(spec: str, lm: dict) -> list[str]:
    """What the alias table knows about `spec` (decoder layers, index_topk: as fields, or in its note as
    "78 layers" / "index_topk 64") against the layer map, for a model whose config is not at hand."""
    entry = mdl.aliases().get(spec) if not Path(spec).expanduser().is_dir() else None
    if not isinstance(entry, dict):
        return []
    note = str(entry.get("note", ""))
    known = {"decoder layers": entry.get("num_layers"), "index_topk": entry.get("index_topk")}
    if known["decoder layers"] is None and "not confirmed" not in note:
        m = re.search(r"\b(\d+) layers\b", note)
        known["decoder layers"] = int(m.group(1)) if m else None
    if known["index_topk"] is None:
        m = re.search(r"\bindex_topk (\d+)\b", note)
        known["index_topk"] = int(m.group(1)) if m else None
    ours = {"decoder layers": lm.get("num_layers"), "index_topk": (lm.get("provenance") or {}).get("index_topk")}
    return [f"the layer map was calibrated on a model with {what} {ours[what]}; {spec} ({entry.get('id') or entry.get('path')}) "
            f"has {known[what]}" for what in known if known[what] is not None and ours[what] is not None and known[what] != ours[what]]


def _engine_model(spec: str) -> str:
    """An alias as the engine must be given it: its hub id or path (engines do not know this tool's aliases)."""
    try:
        if spec in mdl.aliases() and not Path(spec).expanduser().is_dir():
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
    family, pattern, positions = lm_family(lm), lm["pattern"], lm_positions(lm)
    if engine not in family.engines:
        what = "has no indexer sharing" if engine == "transformers" else "does not read an IndexCache pattern"
        raise CalibError(f"{engine} {what} for {family.name} ({(lm.get('provenance') or {}).get('architecture', '?')})",
                         hint=consumers_note(family))
    why = family.runs(pattern, positions)
    if why:
        raise CalibError(f"{family.name} cannot run this pattern: {why}", hint="calibrate again with this version of indexcache")
    notes = []
    if model is not None:
        problems = _alias_problems(model, lm)
        if problems:
            raise CalibError(f"the layer map does not fit {model}: {'; '.join(problems)}",
                             hint=f"calibrate {model} itself, or pass the --model the layer map was calibrated on")
    try:  # the model the engine will load, wherever its config can be read
        info = read_model(model or default_model(lm))
    except CalibError as e:
        local = model is not None and model.startswith(("/", "./", "../", "~"))  # hub ids are org/name
        if local and not Path(model).expanduser().exists():  # a path, not a hub id: the engine would not find it either
            raise CalibError(f"--model {model} does not exist", hint="pass the model directory or hub id the engine loads") from None
        if model is not None:
            notes.append(f"not checked against {model}: {e.message}")
    else:
        problems, notes = provenance_problems(lm, info)
        if info.checkpoint is None:
            problems.append(info.problem)
        elif len(pattern) != len(info.checkpoint.positions):
            problems.append(f"its pattern has {len(pattern)} characters, {info.spec} has {len(info.checkpoint.positions)} indexer layers")
        if problems:
            raise CalibError(f"the layer map does not fit {info.spec}: {'; '.join(problems)}",
                             hint=f"calibrate {info.spec} itself, or check with: indexcache validate LAYER_MAP --model {info.spec}")
    model = _engine_model(model) if model else default_model(lm)
    num_layers = lm.get("num_layers") if isinstance(lm.get("num_layers"), int) else len(pattern)
    keys = engine_keys(family, pattern, positions, num_layers, engine)
    length_keys, length_note = engine_setting(lm, engine)
    if engine != "transformers":  # transformers takes indexer_types alone, in its snippet
        keys.update(length_keys)
    if length_note:
        notes.append(length_note)
    overrides = json.dumps(keys, separators=(",", ":"))
    result = {"engine": engine, "model": model, "overrides": keys, "notes": notes}
    if engine == "vllm":
        result["argv"] = ["vllm", "serve", model, "--hf-overrides", overrides]
    elif engine == "sglang":
        result["argv"] = ["python", "-m", "sglang.launch_server", "--model-path", model, "--json-model-override-args", overrides]
    if "argv" in result:
        result["text"] = shlex.join(result["argv"])
    elif engine == "trtllm":
        result["text"] = overrides
        notes.append(f"TensorRT-LLM reads these keys from the checkpoint's config.json: merge them into {model}'s, or "
                     "let `indexcache apply` write a model directory that carries them")
    else:
        result["text"] = _transformers_snippet(family, lm, model, keys["indexer_types"])
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
    if out.is_dir() and any(out.iterdir()) and not _written_by_apply(out):
        raise CalibError(f"--out {out} holds files this tool did not write; --overwrite only replaces a directory written by "
                         "indexcache apply (config.json with a pattern, every other entry a link)",
                         hint="choose another --out, or empty it yourself")


def _written_by_apply(out: Path) -> bool:
    """What `apply` writes, and all that replacing it removes: config.json with `index_topk_pattern`, and links
    (symlinks, or hard links where symlinks fail). Removing a link loses no data; a copy or any other file could."""
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or "index_topk_pattern" not in config:
        return False
    return all(p.name == "config.json" or p.is_symlink() or (p.is_file() and p.stat().st_nlink > 1) for p in out.iterdir())


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
    pattern, family, positions = lm["pattern"], model.checkpoint.family, model.checkpoint.positions
    config = json.loads(json.dumps(model.config))
    keys = engine_keys(family, pattern, positions, model.checkpoint.num_layers, "vllm")
    if not ({"vllm", "sglang"} & set(family.engines)):
        keys.pop("use_index_cache")
    config.update(keys)
    if isinstance(config.get("text_config"), dict):  # composite models: transformers reads the text config
        config["text_config"].update(keys)
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
    return Applied(out, source, linked, method[1], "transformers" not in family.engines, report.notes)


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
        by = f"{_se_ratio(gap / se)} SE"
    if short:
        return f"{by} over layer {step['runner_up']}"
    return f"layer {chosen} over layer {step['runner_up']} by {by}"


def _se_ratio(ratio: float) -> str:
    """gap/SE with one decimal, or as many more as it takes to stay on the side of the decided rule
    it is on: 1.966 is "1.97", never "2.0"."""
    for digits in range(1, 7):
        text = f"{ratio:.{digits}f}"
        if (float(text) >= DECIDED_SE) == (ratio >= DECIDED_SE):
            return text
    return repr(ratio)


def undecided_line(path_rows: list[dict]) -> str | None:
    """One line naming the steps decided by less than 2 SE, or None when every step was decided."""
    rows = [r for r in path_rows if not r.get("decided", True)]
    if not rows:
        return None
    return f"{UNDECIDED}: " + "; ".join(f"step {r['step']} ({margin_note(r)})" for r in rows)


def tolerance_text(search: dict) -> str | None:
    """The race's indifference zone per step and what it can have given away over the run; None without one."""
    race = search.get("race")
    tol = (race or {}).get("tolerance")
    if not tol or not tol.get("requested"):
        return None
    per = [t for t in tol["nats_per_step"] if t is not None]
    size = (f"auto: {min(per):.2g}-{max(per):.2g} nats" if per and min(per) != max(per) else f"auto: {per[0]:.2g} nats" if per
            else "auto") if tol["requested"] == "auto" else f"{tol['requested']:.4g} nats"
    ended = tol["steps_ended_early"]
    return (f"{size} per step at {race['confidence']:.0%} confidence; {plural(ended, 'step')} let candidates go within it: "
            f"at most {tol['given_away_at_most']:.5f} nats given away against the best candidate each step raced")


def summary(lm: dict, path: Path | None = None) -> dict:
    """What `show` draws, as data. Rows are pattern positions, named by their decoder layer."""
    pattern = lm["pattern"]
    if not isinstance(pattern, str) or check_pattern(pattern):
        raise CalibError(f"the layer map's pattern {pattern!r} is not a pattern of 'F' and 'S' starting with 'F'")
    positions = lm_positions(lm)
    sources = source_layers(pattern, positions)
    overlap = lm.get("layer_overlap") or {}
    fixed = set(lm.get("fixed_shared_layers") or [])
    all_full = lm["loss"]["all_full"]
    layers = [
        {"layer": positions[p], "type": c, "reads_from": sources[p], "overlap": overlap.get(str(positions[p])),
         "no_indexer_weights": positions[p] in fixed}
        for p, c in enumerate(pattern)
    ]
    steps, previous = [], None
    for entry in lm.get("path") or []:
        p = entry["pattern"]
        flipped = [positions[i] for i, (a, b) in enumerate(zip(previous, p)) if a != b] if previous else []
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
        "family": lm.get("family"),
        "pattern": pattern,
        "positions": positions,
        "num_layers": lm.get("num_layers", len(pattern)),
        "num_full": pattern.count("F"),
        "full_layers": full_layers(pattern, positions),
        "loss": lm["loss"],
        "layers": layers,
        "path": steps,
        "uniform": uniform,
        # Steps whose choice beat the runner-up by less than 2 paired standard errors over the calibration
        # sequences: more sequences would separate these layers.
        "undecided_steps": [s["step"] for s in undecided],
        "search": {"strategy": (lm.get("search") or {}).get("strategy"), "tolerance": tolerance_text(lm.get("search") or {})},
        "provenance": lm.get("provenance") or {},
        "length_curve": lm.get(LENGTH_CURVE),
        "objective": lm.get("objective") or {"name": "lm"},
        "retrieval": lm.get(RETRIEVAL),
    }
