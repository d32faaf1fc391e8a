"""Model plumbing: resolve --model, load it with transformers + accelerate, and find its indexers."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import convert_file_size_to_int
from safetensors import safe_open

from indexcache_calib.errors import CalibError
from indexcache_calib.families import family_of, resolve_attr

# transformers and huggingface_hub are imported inside the functions that use them: huggingface_hub reads
# HF_HUB_OFFLINE once, when imported, and the commands set it (cli_common._quiet_libraries) after importing the
# modules that import this one (deploy, convert, distill).

PACKAGE_DIR = Path(__file__).parent
DTYPES = ("auto", "float32", "bfloat16", "float16")


def aliases() -> dict[str, dict]:
    """The shipped alias table, extended (and overridden) by the JSON file in $INDEXCACHE_ALIASES."""
    table = json.loads((PACKAGE_DIR / "aliases.json").read_text())
    extra = os.environ.get("INDEXCACHE_ALIASES")
    if extra:
        try:
            table.update(json.loads(Path(extra).read_text()))
        except (OSError, ValueError) as e:
            raise CalibError(f"cannot read alias file {extra}: {e}", hint="INDEXCACHE_ALIASES must name a JSON object file")
    return table


@dataclass
class ModelSource:
    spec: str  # what the user typed
    location: str  # directory or hub id handed to from_pretrained
    is_local: bool


def resolve(spec: str) -> ModelSource:
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(spec, str(path.resolve()), True)
    table = aliases()
    if spec in table:
        entry = table[spec]
        if "path" in entry:
            local = Path(entry["path"])
            local = local if local.is_absolute() else PACKAGE_DIR / local
            if not local.is_dir():
                raise CalibError(f"alias {spec!r} points to {local}, which does not exist")
            return ModelSource(spec, str(local.resolve()), True)
        return ModelSource(spec, entry["id"], False)
    if spec.count("/") == 1 and not path.exists() and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, spec, False)
    raise CalibError(
        f"model {spec!r} not found: it is not a directory, a known alias, or a hub id",
        hint=f"known aliases: {', '.join(sorted(table))}",
    )


def _not_found(source: ModelSource, config_only: bool = False) -> CalibError:
    if source.is_local:
        return CalibError(f"{source.location} is not a model directory (no readable config.json)")
    if config_only:  # validate and export read the config alone: a 1.4 TiB download is not needed for them
        hint = (f"its config is enough here: hf download {source.location} config.json (calibrate and apply need the "
                "whole checkpoint)")
    else:
        hint = f"download it first (hf download {source.location}) or pass a local checkpoint directory"
    return CalibError(f"model {source.location!r} is not in the local Hugging Face cache", hint=hint)


def load_config(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig  # deferred: see HF_HUB_OFFLINE at the top

    raw = _raw_config(source)
    if raw is not None and raw.get("auto_map") and not trust_remote_code:
        raise CalibError(
            f"{source.spec} ships its own model code (auto_map in config.json), which runs only with --trust-remote-code",
            hint="read the code first; then pass --trust-remote-code if you trust it",
        )
    try:
        config = AutoConfig.from_pretrained(source.location, local_files_only=True, trust_remote_code=trust_remote_code)
    except OSError:
        raise _not_found(source) from None
    except ValueError as e:
        raise CalibError(f"cannot read the config of {source.spec}: {str(e).splitlines()[0]}") from None
    family_of(config, source.spec)
    return config


def _raw_config(source: ModelSource) -> dict | None:
    path = config_path(source)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise CalibError(f"{path} is not valid JSON") from None


def read_config_json(spec: str) -> tuple[ModelSource, Path, dict]:
    """A checkpoint's config.json as written, before transformers reads it: (source, directory, dict)."""
    source = resolve(spec)
    path = config_path(source)
    if path is None:
        raise _not_found(source, config_only=True)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CalibError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise CalibError(f"{path} is not a JSON object")
    return source, path.parent, raw


def config_path(source: ModelSource) -> Path | None:
    if source.is_local:
        p = Path(source.location) / "config.json"
        return p if p.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache  # deferred: see HF_HUB_OFFLINE at the top

        p = try_to_load_from_cache(source.location, "config.json")
        return Path(p) if isinstance(p, str) else None
    except Exception:
        return None


def config_sha256(source: ModelSource) -> str | None:
    p = config_path(source)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p else None


# The keys `apply` writes into config.json (deploy.engine_keys): a pattern, not another model.
PATTERN_KEYS = ("index_topk_pattern", "indexer_types", "use_index_cache")


def _unpatterned_sha256s(config: dict) -> set[str]:
    """Hashes of `config` without the pattern keys, as config.json files are written: by transformers
    (indent 2, sorted keys) or by hand and by `apply` (indent 2, in order), with or without a final newline."""
    def strip(d: dict, keys, all_full: bool) -> dict:
        d = {k: v for k, v in d.items() if k not in keys}
        if all_full and isinstance(d.get("indexer_types"), list):
            d["indexer_types"] = ["full"] * len(d["indexer_types"])
        if isinstance(d.get("text_config"), dict):
            d["text_config"] = strip(d["text_config"], keys, all_full)
        return d

    out = set()
    # The model calibrated on may carry indexer_types of its own: checkpoints saved by transformers do, every
    # layer "full" unless a pattern was set.
    for keys, all_full in ((PATTERN_KEYS, False), (("index_topk_pattern", "use_index_cache"), True)):
        d = strip(config, keys, all_full)
        for sort_keys in (True, False):
            for ascii_ in (True, False):
                text = json.dumps(d, indent=2, sort_keys=sort_keys, ensure_ascii=ascii_)
                out |= {hashlib.sha256(t.encode()).hexdigest() for t in (text, text + "\n")}
    return out


def same_config(calibrated_sha: str | None, source: ModelSource) -> bool | None:
    """Whether the config.json of `source` is the one whose sha256 a layer map recorded, the pattern keys
    that `apply` writes aside (its own output is the model calibrated on); None when either is unknown."""
    p = config_path(source)
    if not calibrated_sha or p is None:
        return None
    raw = p.read_bytes()
    if hashlib.sha256(raw).hexdigest() == calibrated_sha:
        return True
    try:
        config = json.loads(raw)
    except ValueError:
        return False
    has_keys = isinstance(config, dict) and any(
        k in config or (isinstance(config.get("text_config"), dict) and k in config["text_config"]) for k in PATTERN_KEYS)
    return bool(has_keys) and calibrated_sha in _unpatterned_sha256s(config)


def revision(source: ModelSource) -> str | None:
    """The hub snapshot hash, when the model came from the HF cache."""
    p = config_path(source)
    if p is None or source.is_local:
        return None
    return p.parent.name if p.parent.parent.name == "snapshots" else None


def _weights_format(location: str) -> str:
    files = [p.name for p in Path(location).iterdir()]
    if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        return "safetensors"
    if any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files):
        return "pickle"
    return "none"


def parse_max_memory(spec: str | None) -> dict | None:
    """'0=70GiB,1=70GiB,cpu=400GiB' -> {0: '70GiB', 1: '70GiB', 'cpu': '400GiB'}."""
    if not spec:
        return None
    out: dict = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise CalibError(f"cannot read --max-memory {spec!r}", hint="use e.g. 0=70GiB,1=70GiB,cpu=400GiB")
        try:
            convert_file_size_to_int(value)
        except ValueError:
            raise CalibError(f"cannot read --max-memory {spec!r}: {value!r} is not a size", hint="use e.g. 0=70GiB,1=70GiB,cpu=400GiB") from None
        out[int(key) if key.isdigit() else key] = value
    return out


def parse_device_map(spec: str):
    if spec in ("auto", "balanced", "balanced_low_0", "sequential", "cpu") or spec.startswith("cuda"):
        return spec
    path = Path(spec)
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CalibError(f"cannot read device map {spec}: {e}")
    raise CalibError(f"unknown --device-map {spec!r}", hint="use auto, balanced, sequential, cpu, cuda:N or a JSON file")


@dataclass
class Checkpoint:
    """What a checkpoint's config and weight names say, before any weights load."""

    source: ModelSource
    config: object  # the whole config (composite models: text settings in config.get_text_config())
    family: object  # its `families.Family` adapter
    positions: list[int]  # decoder layers with an indexer by architecture: one pattern character each
    indexer_layers: set[int] | None  # layers with indexer weights in the checkpoint; None: no weights to list
    fixed_shared: frozenset[int]  # pattern positions without indexer weights: always S, never candidates
    config_shared: list[int]  # layers the config marks shared although their indexer weights are there

    @property
    def text(self):
        return self.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return int(self.text.num_hidden_layers)

    @property
    def budget(self) -> int:
        """Entries each query selects: index_topk for token and compressed indexers, blocks or tokens else."""
        return int(self.family.budget(self.text))


def indexer_weight_layers(directory: Path, indexer_at: str = "self_attn.indexer") -> set[int] | None:
    """Layer ids with any `layers.{i}.<indexer_at>.*` tensor, from the safetensors index or the file
    headers; None when the directory has no safetensors weights to list."""
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\." + re.escape(indexer_at) + r"\.")
    names: list[str] = []
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    try:
        if indexes:
            for index in indexes:
                names += list(json.loads(index.read_text())["weight_map"])
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                return None
            for f in files:
                with safe_open(str(f), framework="numpy") as handle:
                    names += list(handle.keys())
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same thing to the user
        raise CalibError(f"cannot list the weights in {directory}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return {int(m.group(1)) for n in names if (m := pattern.search(n))}


def inspect_checkpoint(source: ModelSource, trust_remote_code: bool = False) -> Checkpoint:
    """The family, pattern positions and fixed-Shared layers of a checkpoint. A layer is fixed Shared only
    when the checkpoint has no indexer weights for it; a config that marks layers shared whose weights
    are there (a directory written by `apply`, say) is noted, and those indexers are restored on load."""
    config = load_config(source, trust_remote_code)
    family = family_of(config, source.spec)
    text = config.get_text_config()
    name = source.spec
    why = family.usable(text)
    if why:
        raise CalibError(f"{name} ({family.name}) cannot be calibrated: {why}")
    positions = family.positions(text)
    if not positions:
        raise CalibError(f"{name}: no decoder layer of this {family.name} config has a lightning indexer, so there is nothing to share",
                         hint="check layer_types in its config")
    path = config_path(source)
    weights = indexer_weight_layers(path.parent, family.indexer_at) if path is not None else None
    marked = getattr(text, family.native_key, None) if family.native_key else None
    marked = list(marked) if marked else None
    if weights is not None and weights:
        missing = [l for l in positions if l not in weights]
    elif marked is not None:  # no weight names to go by: trust what the config builds
        missing = [l for l in positions if l < len(marked) and marked[l] == "shared"]
    else:
        missing = []
    if missing and family.native_key is None:
        raise CalibError(
            f"{name}: the checkpoint has no indexer weights for layers {missing}, and {type(config).__name__} "
            f"({family.name}) cannot build a layer without its indexer, so the model itself would run untrained indexers there",
            hint="use a checkpoint with every indexer, or a family whose library shares natively",
        )
    if positions[0] in missing:
        raise CalibError(f"{name}: layer {positions[0]}, the first with an indexer, has no indexer weights, so no layer can produce top-k indices to share")
    restored = [l for l in positions if marked is not None and l < len(marked) and marked[l] == "shared" and l not in missing]
    index = {l: p for p, l in enumerate(positions)}
    fixed = frozenset(index[l] for l in missing)
    return Checkpoint(source, config, family, positions, weights, fixed, restored)


def _auto_class(config):
    """The transformers class that loads this config's language model: a CausalLM where transformers has
    one, else the vision-language class (its text decoder is what is calibrated)."""
    # deferred: see HF_HUB_OFFLINE at the top
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModelForImageTextToText


def loading_config(ckpt: Checkpoint):
    """The config to load with: every pattern position that has indexer weights builds its indexer, so
    the model loads all-Full whatever pattern its config carries."""
    config = copy.deepcopy(ckpt.config)
    key = ckpt.family.native_key
    text = config.get_text_config()
    if key and getattr(text, key, None) is not None:
        types = list(getattr(text, key))
        missing = {ckpt.positions[p] for p in ckpt.fixed_shared}
        for layer in ckpt.positions:
            if layer < len(types):
                types[layer] = "shared" if layer in missing else "full"
        setattr(text, key, types)
    return config


def load_model(
    source: ModelSource,
    device_map: str = "auto",
    dtype: str = "auto",
    max_memory: str | dict | None = None,
    offload_dir: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    checkpoint: Checkpoint | None = None,
):
    ckpt = checkpoint or inspect_checkpoint(source, trust_remote_code)
    if source.is_local:
        fmt = _weights_format(source.location)
        if fmt == "pickle" and not allow_pickle:
            raise CalibError(
                f"{source.location} has only pickle weights (.bin/.pt), which can run code when loaded",
                hint="convert them to safetensors, or pass --allow-pickle if you trust the files",
            )
        if fmt == "none":
            raise CalibError(f"{source.location} has a config.json but no weight files")
    if dtype not in DTYPES:
        raise CalibError(f"unknown --dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    kwargs = dict(
        config=loading_config(ckpt),
        dtype="auto" if dtype == "auto" else getattr(torch, dtype),
        device_map=parse_device_map(device_map),
        local_files_only=True,
        trust_remote_code=trust_remote_code,
    )
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if max_memory:
        kwargs["max_memory"] = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    if offload_dir:
        kwargs["offload_folder"] = offload_dir
    try:
        model = _auto_class(ckpt.config).from_pretrained(source.location, **kwargs)
    except OSError as e:
        raise CalibError(f"cannot load weights of {source.spec}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        msg = str(e).splitlines()[0]
        hint = "set --offload-dir, or raise --max-memory" if "offload" in msg.lower() else None
        raise CalibError(f"cannot load {source.spec}: {msg}", hint=hint) from None
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class DsaLayout:
    """Where the DSA parts of a loaded model are. Patterns have one character per position."""

    family: object  # `families.Family`
    decoder: object  # the text decoder (its `layers` are run by the model's own forward)
    layers: list  # decoder layers, in order
    positions: list[int]  # decoder layer of each pattern position
    parents: list  # per position: the module holding the indexer attribute
    indexers: list  # per position: the indexer, or None where the checkpoint has none (fixed shared)
    budget: int  # entries each query selects (index_topk for token indexers)
    text: object = None  # the text config
    fixed_shared: frozenset[int] = field(default_factory=frozenset)  # positions, not layer ids

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_positions(self) -> int:
        return len(self.positions)

    @property
    def attr(self) -> str:
        return self.family.indexer_at.rsplit(".", 1)[-1]


def find_dsa(model, ckpt: Checkpoint, name: str = "model") -> DsaLayout:
    """Find each position's indexer where the family's adapter says it is, and check that the loaded
    model agrees with the adapter: an indexer at every position with weights, none elsewhere."""
    family = ckpt.family
    decoder = model.get_decoder()
    layers = list(getattr(decoder, "layers", []))[: ckpt.num_layers]
    if len(layers) != ckpt.num_layers:
        raise CalibError(f"{name}: found {len(layers)} decoder layers, its config says {ckpt.num_layers}")
    index = {l: p for p, l in enumerate(ckpt.positions)}
    parents, indexers = [], []
    for i, layer in enumerate(layers):
        parent, attr = resolve_attr(layer, family.indexer_at)
        module = getattr(parent, attr, None) if parent is not None else None
        p = index.get(i)
        if p is None:
            if module is not None:
                raise CalibError(f"{name}: layer {i} has an indexer but the {family.name} adapter says it has none")
            continue
        if parent is None:
            raise CalibError(f"{name}: layer {i} has no {family.indexer_at.rsplit('.', 1)[0]} where the {family.name} adapter expects its indexer")
        if (module is None) != (p in ckpt.fixed_shared):
            state = "has no indexer" if module is None else "has an indexer but no indexer weights in the checkpoint"
            raise CalibError(f"{name}: layer {i} {state}; the {family.name} adapter does not match this model")
        parents.append(parent)
        indexers.append(module)
    return DsaLayout(family, decoder, layers, list(ckpt.positions), parents, indexers, ckpt.budget, ckpt.text, ckpt.fixed_shared)


def device_map_of(model) -> dict:
    dm = getattr(model, "hf_device_map", None)
    if dm:
        return {k: str(v) for k, v in sorted(dm.items())}
    return {"": str(next(model.parameters()).device)}


def load_with_layout(spec: str, device_map: str = "cpu", dtype: str = "auto", **kwargs):
    """(model, layout) for a model spec, as `calibrate` loads it (for benchmarks and scripts)."""
    source = resolve(spec)
    ckpt = inspect_checkpoint(source, kwargs.get("trust_remote_code", False))
    model = load_model(source, device_map, dtype, checkpoint=ckpt, **kwargs)
    return model, find_dsa(model, ckpt, spec)
