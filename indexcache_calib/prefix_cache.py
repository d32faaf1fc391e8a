"""Prefix reuse: a candidate that flips the layer at position p starts at that layer, and every layer before it
replays what the committed pattern's run recorded there, without running anything.

Each decoder layer stands in a `_Slot` for the length of a forward; the `Driver` behind the slots replays the
layers before `start` (the output of layer start-1 and the arguments the model threads between layers after
it), runs the rest, and records into a `Store` the layer inputs and Full layers' selections a later
candidate can start from. A `Store` holds nested tensors keyed by (kind, layer, batch) on the CPU, on their
own device, or on disk. The runner (runner.py) decides what is scored and what is kept."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from indexcache_calib.attention import on_device

def _flatten(obj, out: list):
    """Tensors of a nested tuple/list/dict (what decoder layers return and thread) and how to rebuild it."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return ("t", len(out) - 1)
    if isinstance(obj, (tuple, list)):
        return (type(obj), [_flatten(v, out) for v in obj])
    if isinstance(obj, dict):
        return ("d", [(k, _flatten(v, out)) for k, v in obj.items()])
    return ("v", obj)


def _rebuild(spec, tensors: list):
    tag, body = spec
    if tag == "t":
        return tensors[body]
    if tag == "d":
        return {k: _rebuild(v, tensors) for k, v in body}
    if tag == "v":
        return body
    return tag(_rebuild(v, tensors) for v in body)


class _Current:
    """Stands for the selection in flight inside a cached layer output: layers thread it on to the next
    layer, and it is cached once already, under its own layer."""


_CURRENT = _Current()


def _without(obj, current):
    if current is not None and obj is current:
        return _CURRENT
    if isinstance(obj, (tuple, list)):
        return type(obj)(_without(v, current) for v in obj)
    return obj


def _with(obj, current):
    if obj is _CURRENT:
        return current
    if isinstance(obj, (tuple, list)):
        return type(obj)(_with(v, current) for v in obj)
    return obj


class Store:
    """Prefix cache: nested tensors keyed by (kind, layer, batch), on cpu, on their device, or on disk."""

    def __init__(self, where: str):
        self.where = where
        self.items: dict = {}
        self.bytes = 0
        self._dir = tempfile.TemporaryDirectory(prefix="indexcache-cache-") if where == "disk" else None
        self._adopted: list = []

    def put(self, key, obj) -> None:
        self.drop(key)
        tensors: list = []
        spec = _flatten(obj, tensors)
        size = sum(t.numel() * t.element_size() for t in tensors)
        devices = [t.device for t in tensors]
        if self.where == "cpu":
            held = [t.to("cpu", copy=True) for t in tensors]
        elif self.where == "disk":
            path = Path(self._dir.name) / ("_".join(map(str, key)) + ".safetensors")
            save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(tensors)}, str(path))
            held = path
        else:
            held = [t.clone() for t in tensors]
        self.items[key] = ((spec, held, devices), size)
        self.bytes += size

    def get(self, key):
        (spec, held, devices), _ = self.items[key]
        if self.where == "disk":
            loaded = load_file(str(held))
            held = [loaded[str(i)] for i in range(len(devices))]
        return _rebuild(spec, [t.to(d) for t, d in zip(held, devices)])

    def drop(self, key) -> None:
        if key in self.items:
            self.bytes -= self.items.pop(key)[1]

    def adopt(self, other: "Store") -> None:
        """Take over every entry of `other` (its temp directory stays alive with this store)."""
        for key in list(other.items):
            self.drop(key)
        self.items.update(other.items)
        self.bytes += other.bytes
        self._adopted += other._adopted + ([other._dir] if other._dir is not None else [])
        other.items, other.bytes, other._dir, other._adopted = {}, 0, None, []

    def close(self) -> None:
        self.items.clear()
        self.bytes = 0
        for d in self._adopted + ([self._dir] if self._dir is not None else []):
            d.cleanup()
        self._adopted, self._dir = [], None


class _Slot(nn.Module):
    """Stands where a decoder layer is, for one forward: runs it, or replays a recorded output. Every
    other attribute the model's forward asks of a layer is the layer's own."""

    def __init__(self, layer: nn.Module, index: int, driver: "Driver"):
        super().__init__()
        object.__setattr__(self, "wrapped", layer)
        object.__setattr__(self, "driver", driver)
        object.__setattr__(self, "index", index)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "wrapped"), name)

    def forward(self, *args, **kwargs):
        return self.driver.call(self.index, self.wrapped, args, kwargs)


class Driver:
    """What the slots do during one forward: replay layers before `start`, run the rest, and record the
    outputs and selections a later candidate can start from."""

    def __init__(self, runner):  # a runner.PatternRunner: its layout, sharing state, counters and note_cache
        self.runner = runner
        self.start = 0
        self.replay = None  # (output of layer start-1, carried kwargs after it)
        self.into = None
        self.batch = 0
        self.record_at: set[int] = set()  # layers whose input (the previous layer's output) is kept
        self.full_at: set[int] = set()  # layers whose selection is kept
        self.last_output = None

    def call(self, i: int, layer, args, kwargs):
        runner = self.runner
        if i < self.start:
            output, carried = self.replay
            output = _with(output, runner.state.current)
            if i == self.start - 1:
                for name, value in carried.items():
                    kwargs[name].clear()
                    kwargs[name].update(value)
            return output
        device = _execution_device(layer)
        out = layer(*(on_device(a, device) for a in args), **{k: on_device(v, device) for k, v in kwargs.items()})
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        runner.counters.layer_forwards += hidden.shape[0]
        runner.counters.tokens += hidden.shape[0] * hidden.shape[1]
        if self.into is not None:
            if i + 1 in self.record_at:
                carried = {name: dict(kwargs[name]) for name in runner.layout.family.carried}
                self.into.put(("hidden", i + 1, self.batch), (_without(out, runner.state.current), carried))
            if i in self.full_at:
                self.into.put(("topk", i, self.batch), runner.state.current)
            runner.note_cache(self.into)
        if i == runner.layout.num_layers - 1:
            self.last_output = out
        return out


def _execution_device(layer):
    """Where a decoder layer runs: accelerate's hook says so for dispatched models; else its weights."""
    hook = getattr(layer, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:
        if getattr(h, "execution_device", None) is not None:
            return h.execution_device
    param = next(layer.parameters(), None)
    return None if param is None or param.device.type == "meta" else param.device


@contextmanager
def slots(layout, driver: Driver):
    layers = layout.decoder.layers
    originals = [layers[i] for i in range(layout.num_layers)]
    for i, layer in enumerate(originals):
        layers[i] = _Slot(layer, i, driver)
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
