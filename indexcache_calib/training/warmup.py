"""Indexer training: the one implementation behind `indexcache dsa-convert` (dense indexer warm-up),
`indexcache distill` (the paper's multi-layer distillation, §3.2) and the tiny-model recipe.

Everything the model computes is computed by the model:

- Targets: one forward of the model's own base model with every indexer answering "all keys", so attention
  is dense; a forward hook on each attention module keeps its eager attention probabilities, summed over
  heads and L1-normalised over keys (the head-aggregated distribution p of the paper).
- Index scores: the library's own indexer `forward`, run with gradients on the inputs it was called with in
  that forward. The tensor it hands to `topk` (the masked index scores) is kept; its softmax is q. The only
  change is that the per-query q·k product, which the library broadcasts over every query, runs as one
  batched matmul; `check_batched_scores` compares that against the unchanged call and refuses a difference.

Loss for a Full layer l serving layers l..l+m (m = 0 in the warm-up):

    L_multi = sum_j 1/(m+1) KL(p^(l+j) || q^(l)),   averaged over queries,

whose gradient is that of KL(mean_j p^(l+j) || q^(l)); the value reported is L_multi itself.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from indexcache_calib.errors import CalibError
from indexcache_calib.families import lookup, resolve_attr
from indexcache_calib.stats import mean_se

# Index scores at or below this are masked (the library adds finfo.min or fills -inf).
MASKED = -1e30


# ----------------------------------------------------------------------------- the model's parts

def base_model(model):
    """The decoder stack without the LM head (its forward returns hidden states)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def decoder_layers(model) -> list:
    base = base_model(model)
    layers = list(getattr(base, "layers", []))
    config = getattr(base, "config", model.config)
    n = getattr(config, "num_hidden_layers", len(layers))
    return layers[:n]


def attention_of(model, layer):
    """The layer's attention module, where the family's row says it is (`self_attn` in a model without an
    indexer, such as the MLA source of dsa-convert)."""
    family = lookup(model.config)
    return getattr(layer, family.attention_at if family else "self_attn")


def indexers(model) -> dict[int, torch.nn.Module]:
    """Layer id -> indexer module, for the layers that have one (Shared layers built by the library have none;
    a model without an indexer family has none at all)."""
    family = lookup(model.config)
    if family is None:
        return {}
    path = family.indexer_at
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        parent, name = resolve_attr(layer, path)
        ix = getattr(parent, name, None) if parent is not None else None
        if ix is not None:
            out[i] = ix
    return out


def indexer_param_names(model, layer_ids) -> dict[str, torch.nn.Parameter]:
    """Qualified parameter name -> parameter, for the indexers of `layer_ids`."""
    wanted = {id(ix): i for i, ix in indexers(model).items() if i in set(layer_ids)}
    out = {}
    for mod_name, module in model.named_modules():
        if id(module) in wanted:
            for p_name, p in module.named_parameters():
                out[f"{mod_name}.{p_name}"] = p
    return out


def library_forward(module):
    """The class's own forward without its `torch.no_grad()` decorator."""
    fwd = type(module).forward
    return getattr(fwd, "__wrapped__", fwd)


# ----------------------------------------------------------------------------- dense forward and targets

@dataclass
class Call:
    """One indexer call as the attention module made it."""

    args: tuple
    kwargs: dict

    def bound(self, indexer) -> inspect.BoundArguments:
        return inspect.signature(library_forward(indexer)).bind(indexer, *self.args, **self.kwargs)


def _all_keys(indexer, args, kwargs) -> torch.Tensor:
    """Every key for every query, in the format the attention module scatters into its mask: int32 [B, S, T]."""
    b = inspect.signature(library_forward(indexer)).bind(indexer, *args, **kwargs).arguments
    hidden, mask = b["hidden_states"], b.get("attention_mask")
    batch, seq = hidden.shape[:2]
    keys = mask.shape[-1] if mask is not None and mask.dim() >= 3 else seq
    return torch.arange(keys, device=hidden.device, dtype=torch.int32).expand(batch, seq, keys)


@contextlib.contextmanager
def swap_indexers(model, make_forward):
    """Inside: each indexer's forward is `make_forward(layer_id, indexer)`; what was there (an accelerate
    hook's forward, for one) is put back after."""
    saved = []
    for i, ix in indexers(model).items():
        saved.append((ix, ix.__dict__.get("forward")))
        ix.forward = make_forward(i, ix)
    try:
        yield
    finally:
        for ix, fwd in saved:
            if fwd is None:
                del ix.forward
            else:
                ix.forward = fwd


@contextlib.contextmanager
def attention_probs(model, probs: dict, layers=None):
    """Inside: `probs[i]` receives layer i's attention probabilities summed over heads and L1-normalised over
    keys, [B, S, T] fp32 (heads with an attention sink leave mass outside the keys; it is renormalised away).
    Needs eager attention."""

    def hook(i):
        def fn(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise CalibError("the attention module returned no attention probabilities: indexer training "
                                 "needs eager attention (set_attn_implementation('eager'))")
            agg = weights.detach().float().sum(1)
            probs[i] = agg / agg.sum(-1, keepdim=True).clamp_min(1e-30)
        return fn

    handles = [attention_of(model, layer).register_forward_hook(hook(i)) for i, layer in enumerate(decoder_layers(model))
               if layers is None or i in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def dense(model, calls: dict | None = None, probs: dict | None = None, prob_layers=None):
    """Inside: every indexer returns all keys, so attention is dense. `calls` receives each indexer's call
    (layer id -> Call); `probs` the head-aggregated attention probabilities of the layers in `prob_layers`
    (all when None)."""

    def make(i, ix):
        def forward(*args, **kwargs):
            if calls is not None:
                calls[i] = Call(args, kwargs)
            return _all_keys(ix, args, kwargs)
        return forward

    with swap_indexers(model, make), (attention_probs(model, probs, prob_layers) if probs is not None else contextlib.nullcontext()):
        yield


def use_eager(model) -> str:
    """Switch to eager attention (the only one that returns probabilities); returns what was there."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    return previous


# ----------------------------------------------------------------------------- index scores

class _Scores(TorchFunctionMode):
    """While an indexer's forward runs: keep the input of its last `topk` (the masked index scores), and,
    when `batched`, run the [B,S,H,D] x [B,1,D,T] broadcast product as one [B,S*H,D] x [B,D,T] matmul."""

    def __init__(self, batched: bool):
        super().__init__()
        self.batched = batched
        self.scores = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.topk:
            self.scores = args[0]
        elif self.batched and func is torch.matmul and len(args) == 2 and not kwargs:
            a, b = args
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 4 and b.dim() == 4
                    and b.shape[1] == 1 and a.shape[1] > 1 and a.shape[0] == b.shape[0] and a.shape[3] == b.shape[2]):
                bs, s, h, d = a.shape
                return torch.matmul(a.reshape(bs, s * h, d), b[:, 0]).view(bs, s, h, b.shape[-1])
        return func(*args, **kwargs)


def index_scores(indexer, call: Call, grad: bool = True, batched: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked index scores [B, S, T] fp32, the indexer's own top-k), from the library's forward."""
    mode = _Scores(batched)
    with torch.set_grad_enabled(grad), mode:
        topk = library_forward(indexer)(indexer, *call.args, **call.kwargs)
    if mode.scores is None:
        raise CalibError(f"{type(indexer).__name__}.forward never called topk, so its scores cannot be read")
    return mode.scores, topk


def check_batched_scores(indexer, call: Call) -> float:
    """Largest difference, relative to the largest visible score, between the batched product and the
    library's unchanged call, on the first sequence; refuses above 1e-4."""
    first = Call(tuple(_first(a) for a in call.args), {k: _first(v) for k, v in call.kwargs.items()})
    fast, _ = index_scores(indexer, first, grad=False, batched=True)
    ref, _ = index_scores(indexer, first, grad=False, batched=False)
    visible = ref > MASKED
    if not torch.equal(visible, fast > MASKED):
        raise CalibError(f"{type(indexer).__name__}: the batched index scores mask other keys than the library's")
    scale = ref[visible].abs().max().clamp_min(1e-12)
    diff = float(((fast - ref)[visible].abs().max() / scale).item()) if visible.any() else 0.0
    if diff > 1e-4:
        raise CalibError(f"{type(indexer).__name__}: batched index scores differ from the library's by {diff:.2e} "
                         "(relative), so training would not optimise the model's own indexer")
    return diff


def _first(x):
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] > 1:
        return x[:1]
    if isinstance(x, tuple) and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(_first(t) for t in x)
    return x


# ----------------------------------------------------------------------------- loss

def multi_layer_kl(targets: list[torch.Tensor], scores: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(differentiable loss, L_multi value) for one Full layer's scores against the served layers' targets.

    targets: head-aggregated probabilities [B, S, T] of each served layer; scores: [B, S, T] masked index
    scores. The loss is sum_j 1/(m+1) KL(p_j || softmax(scores)), averaged over queries; its gradient is
    that of KL(mean_j p_j || q). Target mass on a key the indexer masks is refused (masks disagree)."""
    keep = scores.detach() > MASKED
    logq = torch.log_softmax(scores.float().masked_fill(~keep, float("-inf")), dim=-1).masked_fill(~keep, 0.0)
    p_mean = torch.stack([p.to(scores.device) for p in targets]).mean(0)
    outside = float(p_mean.masked_fill(keep, 0.0).sum(-1).max())
    if outside > 1e-3:
        raise CalibError(f"attention puts {outside:.3g} of its mass on keys the indexer masks; the masks disagree")
    neg_entropy = torch.stack([torch.xlogy(p, p).sum(-1) for p in targets]).mean(0).to(scores.device)
    loss = (neg_entropy - (p_mean * logq).sum(-1)).mean()
    return loss, float(loss.detach())


def full_groups(pattern: str) -> dict[int, list[int]]:
    """Full layer -> the layers it serves (itself and the Shared layers up to the next Full)."""
    groups: dict[int, list[int]] = {}
    last = None
    for i, c in enumerate(pattern):
        if c == "F":
            last = i
            groups[i] = []
        groups[last].append(i)
    return groups


@dataclass
class StepResult:
    loss: float
    layers: dict[int, float] = field(default_factory=dict)


def indexer_step(model, ids: torch.Tensor, groups: dict[int, list[int]], verify: bool = False) -> StepResult:
    """One training step's forward and backward: a dense forward of the frozen model records targets and
    indexer calls; each Full layer's L_multi is backpropagated into its own indexer, one layer's score graph
    alive at a time. Returns the mean L_multi over Full layers. Grad accumulates into the indexers."""
    calls: dict = {}
    probs: dict = {}
    served = {j for g in groups.values() for j in g}
    device = model.get_input_embeddings().weight.device
    with torch.no_grad(), dense(model, calls, probs, served):
        base_model(model)(input_ids=ids.to(device), use_cache=False)
    ixs = indexers(model)
    result = StepResult(0.0)
    for layer, group in groups.items():
        if layer not in calls:
            raise CalibError(f"layer {layer} should run its indexer but was not called")
        if verify:
            check_batched_scores(ixs[layer], calls[layer])
        scores, _ = index_scores(ixs[layer], calls[layer])
        loss, value = multi_layer_kl([probs[j] for j in group], scores)
        (loss / len(groups)).backward()
        result.layers[layer] = value
        result.loss += value / len(groups)
        del scores, loss
    return result


# ----------------------------------------------------------------------------- evaluation

def mass_shares(probs: torch.Tensor, topk: torch.Tensor, k: int):
    """For each query that sees more than k keys (0-based position t >= k), the attention mass inside
    `topk`, inside the best possible k keys, and expected inside k keys drawn uniformly from the t+1
    visible ones: k/(t+1), exactly, so nothing is sampled. probs: [B, S, T]; topk: [B, S, k] key
    indices, all visible at those positions. Returns three [B, S-k] tensors."""
    p = probs[:, k:]
    indexer = p.gather(-1, topk[:, k:].long()).sum(-1)
    oracle = p.topk(k, dim=-1).values.sum(-1)
    t = torch.arange(k, probs.shape[1], device=p.device, dtype=p.dtype)
    return indexer, oracle, (k / (t + 1)).expand_as(oracle)


@torch.no_grad()
def topk_mass(model, ids: torch.Tensor, batch_size: int = 1) -> dict[int, dict]:
    """Per layer with an indexer, over every query that sees more than k keys: the mean share of the
    dense head-aggregated attention mass inside the indexer's own top-k, the best possible top-k, and a
    uniformly drawn top-k (k/(t+1), exactly). The indexers are called as the model calls them."""
    k = None
    sums: dict[int, torch.Tensor] = {}
    rows = 0
    device = model.get_input_embeddings().weight.device
    for b0 in range(0, len(ids), batch_size):
        x = ids[b0:b0 + batch_size].to(device)
        calls, probs = {}, {}
        with dense(model, calls, probs):
            base_model(model)(input_ids=x, use_cache=False)
        for i, ix in indexers(model).items():
            k = int(ix.index_topk)
            top = ix(*calls[i].args, **calls[i].kwargs).to(probs[i].device)
            acc = sums.setdefault(i, torch.zeros(3, dtype=torch.float64))
            for j, share in enumerate(mass_shares(probs[i], top, k)):
                acc[j] += share.double().sum().item()
        rows += x.shape[0] * max(x.shape[1] - (k or 0), 0)
    out = {}
    for i, acc in sorted(sums.items()):
        ind, orc, rnd = (acc / max(rows, 1)).tolist()
        out[i] = {"indexer": ind, "oracle": orc, "random": rnd,
                  "captured": (ind - rnd) / (orc - rnd) if orc > rnd else float("nan")}
    return out


@torch.no_grad()
def sequence_losses(model, ids: torch.Tensor, dense_attention: bool = False) -> list[float]:
    """Mean next-token loss of each sequence, from the model's own forward (`labels=`); with
    `dense_attention` every indexer returns all keys."""
    device = model.get_input_embeddings().weight.device
    out = []
    with dense(model) if dense_attention else contextlib.nullcontext():
        for row in ids:
            x = row.unsqueeze(0).to(device)
            out.append(float(model(input_ids=x, labels=x, use_cache=False).loss))
    return out


def paired(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """Mean of a - b over paired sequences and its standard error (`stats.mean_se`, the search's own)."""
    return mean_se([x - y for x, y in zip(a, b)])


# ----------------------------------------------------------------------------- optimisation

def lr_at(step: int, planned: int, peak: float) -> float:
    """Linear warm-up over min(30, planned/10) steps, then cosine decay to 10% of the peak at `planned`."""
    warm = max(1, min(30, planned // 10))
    if step < warm:
        return peak * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, planned - warm))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def decay_groups(params: list, lr: float, weight_decay: float = 0.1) -> list[dict]:
    """Weight decay on matrices only; norms, biases and vectors are left alone."""
    return [{"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0}]


def freeze_all_but(model, trained: dict[str, torch.nn.Parameter]) -> None:
    ids = {id(p) for p in trained.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


class NonFinite(CalibError):
    pass


class IndexerOptimizer:
    """AdamW on fp32 master copies of the trained indexer parameters (the model may hold them in bf16),
    gradient clipping at 1.0, and a guard: a step whose loss or gradient is not finite is skipped and
    counted; 20 in a row stop training. Its whole state round-trips through `state_tensors`."""

    def __init__(self, params: dict[str, torch.nn.Parameter], lr: float, weight_decay: float = 0.1):
        self.params = params
        self.names = sorted(params)
        self.master = {n: params[n].detach().float().clone() for n in self.names}
        for m in self.master.values():
            m.requires_grad_(True)
        groups = []
        for ndim_big, wd in ((True, weight_decay), (False, 0.0)):
            ps = [self.master[n] for n in self.names if (self.master[n].ndim >= 2) == ndim_big]
            if ps:
                groups.append({"params": ps, "lr": lr, "weight_decay": wd, "peak_lr": lr})
        self.opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=weight_decay)
        self.skipped = 0
        self.streak = 0

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None
        for m in self.master.values():
            m.grad = None

    def step(self, loss: float, lr: float) -> tuple[bool, float]:
        """Apply the gradients in the model's parameters; returns (applied, gradient norm)."""
        for n in self.names:
            g = self.params[n].grad
            self.master[n].grad = torch.zeros_like(self.master[n]) if g is None else g.detach().float().to(self.master[n].device)
        gnorm = float(torch.nn.utils.clip_grad_norm_(list(self.master.values()), 1.0))
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            self.skipped += 1
            self.streak += 1
            self.zero_grad()
            if self.streak >= 20:
                raise NonFinite("20 training steps in a row had a non-finite loss or gradient",
                                hint="lower --lr, or check the data and the model's dtype")
            return False, gnorm
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            for n in self.names:
                self.params[n].copy_(self.master[n].to(self.params[n].dtype))
        self.streak = 0
        self.zero_grad()
        return True, gnorm

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.names:
            m = self.master[n]
            out[f"master/{n}"] = m.detach().cpu().contiguous()
            st = self.opt.state.get(m)
            if st:
                out[f"exp_avg/{n}"] = st["exp_avg"].cpu().contiguous()
                out[f"exp_avg_sq/{n}"] = st["exp_avg_sq"].cpu().contiguous()
                out[f"step/{n}"] = torch.as_tensor(st["step"]).reshape(1).float().cpu()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if f"master/{n}" not in tensors]
        if missing:
            raise CalibError(f"the checkpoint has no state for {len(missing)} trained parameters (e.g. {missing[0]})",
                             hint="start again with --overwrite")
        with torch.no_grad():
            for n in self.names:
                m = self.master[n]
                m.copy_(tensors[f"master/{n}"].to(m.device))
                self.params[n].copy_(m.to(self.params[n].dtype))
                if f"exp_avg/{n}" in tensors:
                    self.opt.state[m] = {
                        "step": tensors[f"step/{n}"].reshape(()).clone(),
                        "exp_avg": tensors[f"exp_avg/{n}"].to(m.device).clone(),
                        "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].to(m.device).clone(),
                    }
