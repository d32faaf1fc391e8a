"""Model plumbing: resolve --model, load it with transformers + accelerate, and find its indexers."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from indexcache_calib.errors import CalibError

PACKAGE_DIR = Path(__file__).parent
PLAIN_MLA_TYPES = {"glm4_moe_lite", "deepseek_v3", "deepseek_v2"}
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


def _not_found(source: ModelSource) -> CalibError:
    if source.is_local:
        return CalibError(f"{source.location} is not a model directory (no readable config.json)")
    return CalibError(
        f"model {source.location!r} is not in the local Hugging Face cache",
        hint=f"download it first (hf download {source.location}) or pass a local checkpoint directory",
    )


def load_config(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

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
    check_dsa_config(config, source.spec)
    return config


def _raw_config(source: ModelSource) -> dict | None:
    path = config_path(source)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise CalibError(f"{path} is not valid JSON") from None


def config_path(source: ModelSource) -> Path | None:
    if source.is_local:
        p = Path(source.location) / "config.json"
        return p if p.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(source.location, "config.json")
        return Path(p) if isinstance(p, str) else None
    except Exception:
        return None


def config_sha256(source: ModelSource) -> str | None:
    p = config_path(source)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p else None


def revision(source: ModelSource) -> str | None:
    """The hub snapshot hash, when the model came from the HF cache."""
    p = config_path(source)
    if p is None or source.is_local:
        return None
    return p.parent.name if p.parent.parent.name == "snapshots" else None


def check_dsa_config(config, name: str) -> None:
    model_type = getattr(config, "model_type", "?")
    if model_type == "glm4_moe_lite":
        raise CalibError(
            f"{name} is not a DSA model: model_type glm4_moe_lite (the published GLM-4.7-Flash) is plain MLA "
            "attention with no lightning indexer, so there are no top-k indices to share",
            hint="IndexCache applies to DSA models such as GLM-5 (glm_moe_dsa) and DeepSeek-V3.2 (deepseek_v32)",
        )
    if getattr(config, "index_topk", None) is None:
        why = " (plain MLA attention)" if model_type in PLAIN_MLA_TYPES else ""
        raise CalibError(
            f"{name} is not a DSA model: model_type {model_type}{why} has no lightning indexer (no index_topk in its config)",
            hint="IndexCache applies to DSA models such as GLM-5 (glm_moe_dsa) and DeepSeek-V3.2 (deepseek_v32)",
        )


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


def load_model(
    source: ModelSource,
    device_map: str = "auto",
    dtype: str = "auto",
    max_memory: str | dict | None = None,
    offload_dir: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    import torch
    from transformers import AutoModelForCausalLM

    load_config(source, trust_remote_code)
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
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
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
    """Where the DSA parts of a loaded model are."""

    layers: list  # decoder layers, in order
    attentions: list  # each layer's attention module (the indexer's parent)
    indexers: list  # each layer's indexer, or None where the checkpoint has none (fixed shared)
    index_topk: int
    fixed_shared: frozenset[int] = field(default_factory=frozenset)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def find_dsa(model, name: str = "model") -> DsaLayout:
    """Find indexers structurally (`<layer>.<attention>.indexer`), so close relatives of the two
    supported classes work too."""
    config = model.config
    check_dsa_config(config, name)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = list(getattr(base, "layers", []))[: config.num_hidden_layers]
    attentions, indexers = [], []
    for layer in layers:
        attn = next((m for m in layer.children() if hasattr(m, "indexer")), None)
        attentions.append(attn)
        indexers.append(getattr(attn, "indexer", None) if attn is not None else None)
    if not layers or all(a is None for a in attentions):
        raise CalibError(f"{name} has index_topk in its config but no layer with a lightning indexer module")
    if indexers[0] is None:
        raise CalibError(f"{name}: layer 0 has no indexer, so no layer can produce top-k indices to share")
    fixed = frozenset(i for i, ix in enumerate(indexers) if ix is None)
    return DsaLayout(layers, attentions, indexers, int(config.index_topk), fixed)


def device_map_of(model) -> dict:
    dm = getattr(model, "hf_device_map", None)
    if dm:
        return {k: str(v) for k, v in sorted(dm.items())}
    return {"": str(next(model.parameters()).device)}
