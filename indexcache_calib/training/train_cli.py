"""`indexcache dsa-convert | distill`: training the lightning indexers. The logic is in convert.py, distill.py,
trainloop.py and warmup.py; this file parses options and draws (progress on stderr, results on stdout)."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from indexcache_calib import cli_common
from indexcache_calib.cli_common import (
    DeviceMap, Dtype, Model, TextField, rerun_command, resume_command,
)
from indexcache_calib.errors import Terminated, plural

# Commands import trainloop, convert and distill (which import torch) inside their functions, so that `--help`
# and argument errors do not load torch.

SEQ_LEN = "Tokens per training sequence; must exceed index_topk. Default: twice index_topk."
SEED = "Seeds the order of the training windows (and, in dsa-convert, the indexers' initial weights)."
CHECKPOINT_EVERY = "Save the training state every N steps (and when interrupted between steps)."
EVAL_DATA = "Held-out data to evaluate the result on (reported on stdout, in the model card and in --json)."
EVAL_SAMPLES = "Held-out sequences of --seq-len tokens to evaluate on."
RESUME = "Continue the unfinished run in --out from its saved training state."
OVERWRITE = "Replace an earlier result of this command in --out."
AS_JSON = "Print the run's record as JSON on stdout."
DATA = "Training text: JSONL (text or messages), .txt, .parquet/.csv, or a saved datasets dir."


@contextmanager
def _handled(out_dir: str, resume_hint: str, rerun: str | None = None):
    """The one error contract of every command (`cli_common.handled`); an interruption says where the
    training state is and how to resume, or, before the first training step was saved (the run's directory
    is then removed, so --resume would find nothing), how to rerun."""
    from indexcache_calib.training import trainloop as tl

    saved: dict = {}

    def lines() -> list[str]:
        where = f"{out_dir}/{tl.STATE_DIR}"
        if saved.get("step"):
            return [f"Interrupted: training state at step {saved['step']} is saved in {where}.", f"Hint: resume with: {resume_hint}"]
        if (Path(out_dir).expanduser() / tl.STATE_DIR / tl.STATE).is_file():
            return [f"Interrupted: the training state is saved in {where}.", f"Hint: resume with: {resume_hint}"]
        return ["Interrupted before the first training step finished: nothing was saved."] + (
            [f"Hint: rerun without --resume: {rerun}"] if rerun else [])

    with cli_common.handled(lines):
        try:
            yield
        except tl.Interrupted as e:  # the loop saved what it had; report it as the interruption it was
            saved["step"] = e.saved_step
            raise (Terminated() if e.terminated else KeyboardInterrupt()) from None


def _hooks():
    """Progress on stderr: a bar with ETA on a terminal, otherwise a line about every 5% of the steps."""
    from indexcache_calib.training import trainloop as tl

    err = cli_common.err
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)
    state = {"task": None, "total": 0, "start": 0, "t0": 0.0, "every": 1}

    def started(total, done):
        state.update(total=total, start=done, t0=time.time(), every=max(1, total // 20))
        state["task"] = progress.add_task("training", total=total, completed=done)

    def step(row):
        progress.update(state["task"], completed=row["step"], description=f"training (loss {row['loss']:.4f})")
        n = row["step"]
        if err.is_terminal or not (n % state["every"] == 0 or n == state["total"] or n == state["start"] + 1):
            return
        rate = (time.time() - state["t0"]) / max(1, n - state["start"])
        eta = rate * (state["total"] - n)
        skipped = "" if row["applied"] else " (skipped: non-finite)"
        err.print(f"step {n}/{state['total']}: loss {row['loss']:.5f} lr {row['lr']:.2e} "
                  f"{row['tokens_per_s']:,.0f} tok/s eta {int(eta // 60)}:{int(eta % 60):02d}{skipped}", markup=False)

    hooks = tl.Hooks(message=lambda t: progress.console.print(t, markup=False), started=started, step=step)
    return progress, hooks


def _warn(text: str) -> None:
    cli_common.err.print(f"Warning: {text}", markup=False)


def _print_result(result: dict, as_json: bool, lines: list[str]) -> None:
    out = cli_common.out
    if as_json:
        out.print(json.dumps(result, sort_keys=True, indent=2), markup=False)
        return
    for line in lines:
        out.print(line, markup=False)


def dsa_convert(
    model: Model = "glm-4.7-flash",
    data: str = typer.Option(..., "--data", "-d", help=DATA),
    out_dir: str = typer.Option(..., "--out", "-o", help="Directory for the converted checkpoint."),
    steps: int = typer.Option(1000, help="Optimizer steps of the indexer warm-up."),
    seq_len: Optional[int] = typer.Option(None, help=SEQ_LEN),
    batch_size: int = typer.Option(1, help="Sequences per optimizer step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate of the indexers (linear warm-up, cosine decay to 10%)."),
    index_topk: Optional[int] = typer.Option(None, help="Keys each query keeps. Default: GlmMoeDsaConfig's, GLM-5's published 2048."),
    index_heads: Optional[int] = typer.Option(None, help="Indexer heads. Default: GlmMoeDsaConfig's, GLM-5's published 32."),
    index_head_dim: Optional[int] = typer.Option(None, help="Indexer head size. Default: GlmMoeDsaConfig's, GLM-5's published 128."),
    seed: int = typer.Option(0, help=SEED),
    text_field: TextField = "text",
    checkpoint_every: int = typer.Option(50, help=CHECKPOINT_EVERY),
    eval_data: Optional[str] = typer.Option(None, help=EVAL_DATA),
    eval_samples: int = typer.Option(16, help=EVAL_SAMPLES),
    device_map: DeviceMap = "auto",
    dtype: Dtype = "auto",
    resume: bool = typer.Option(False, help=RESUME),
    overwrite: bool = typer.Option(False, help=OVERWRITE),
    as_json: bool = typer.Option(False, "--json", help=AS_JSON),
) -> None:
    """Make a DSA (GlmMoeDsa) checkpoint from a glm4_moe_lite (GLM-4.7-Flash) one: same weights, plus
    lightning indexers trained by the dense warm-up with everything else frozen."""
    from indexcache_calib.training.convert import ConvertOptions, convert

    opts = ConvertOptions(model=model, data=data, out=out_dir, steps=steps, seq_len=seq_len, batch_size=batch_size, lr=lr,
                          seed=seed, index_topk=index_topk, index_heads=index_heads, index_head_dim=index_head_dim,
                          text_field=text_field, device_map=device_map, dtype=dtype, checkpoint_every=checkpoint_every,
                          eval_data=eval_data, eval_samples=eval_samples, resume=resume, overwrite=overwrite)
    with _handled(out_dir, resume_command(sys.argv[1:]), rerun_command(sys.argv[1:])):
        cli_common._quiet_libraries()
        progress, hooks = _hooks()
        with progress:
            result = convert(opts, hooks, _warn)
    t, ev = result["training"], result["evaluation"]
    lines = [f"converted: {result['out']} (GlmMoeDsaForCausalLM, {plural(result['model']['num_layers'], 'layer')}, every layer Full)",
             f"indexer warm-up: {plural(t['steps_done'], 'step')}, mean KL {t['first_loss']:.4f} -> {t['last_loss_mean10']:.4f} "
             f"(last 10 steps), {t['steps_skipped']} skipped"]
    if ev:
        loss = ev["loss"]
        se = f" ± {loss['se']:.4f}" if loss["se"] is not None else ""
        lines.append(f"held-out: all-Full sparse - dense loss {loss['sparse_minus_dense']:+.4f}{se} nats; "
                     f"worst layer captures {ev['min_captured']:.2f} of the way from a random to the oracle top-k")
    lines.append(f"next: indexcache calibrate --model {result['out']} --data {data}")
    _print_result(result, as_json, lines)


def distill(
    model: Model = "tiny-dsa",
    data: str = typer.Option(..., "--data", "-d", help=DATA),
    out_dir: str = typer.Option(..., "--out", "-o", help="Directory for the distilled checkpoint."),
    layer_map: Optional[str] = typer.Option(None, "--layer-map", help="Take the pattern from a calibrate run (its directory or layer_map.json)."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="The F/S pattern, one character per layer."),
    uniform: Optional[int] = typer.Option(None, "--uniform", help="Uniform interleaving: one Full layer every N layers (every N layers that ship an indexer, when some do not)."),
    steps: int = typer.Option(500, help="Optimizer steps."),
    seq_len: Optional[int] = typer.Option(None, help=SEQ_LEN),
    batch_size: int = typer.Option(1, help="Sequences per optimizer step."),
    lr: float = typer.Option(3e-4, help="Peak learning rate of the Full layers' indexers (linear warm-up, cosine decay to 10%)."),
    seed: int = typer.Option(0, help=SEED),
    text_field: TextField = "text",
    checkpoint_every: int = typer.Option(50, help=CHECKPOINT_EVERY),
    eval_data: Optional[str] = typer.Option(None, help=EVAL_DATA),
    eval_samples: int = typer.Option(16, help=EVAL_SAMPLES),
    device_map: DeviceMap = "auto",
    dtype: Dtype = "auto",
    resume: bool = typer.Option(False, help=RESUME),
    overwrite: bool = typer.Option(False, help=OVERWRITE),
    as_json: bool = typer.Option(False, "--json", help=AS_JSON),
) -> None:
    """Train the Full layers' indexers of a pattern with the multi-layer distillation loss (training-aware
    IndexCache) and write a checkpoint that carries the pattern and no Shared-layer indexers."""
    from indexcache_calib.training.distill import DistillOptions, distill as run

    opts = DistillOptions(model=model, data=data, out=out_dir, layer_map=layer_map, pattern=pattern, uniform=uniform,
                          steps=steps, seq_len=seq_len, batch_size=batch_size, lr=lr, seed=seed, text_field=text_field,
                          device_map=device_map, dtype=dtype, checkpoint_every=checkpoint_every, eval_data=eval_data,
                          eval_samples=eval_samples, resume=resume, overwrite=overwrite)
    with _handled(out_dir, resume_command(sys.argv[1:]), rerun_command(sys.argv[1:])):
        cli_common._quiet_libraries()
        progress, hooks = _hooks()
        with progress:
            result = run(opts, hooks, _warn)
    t, ev = result["training"], result["evaluation"]
    lines = [f"distilled: {result['out']} (pattern {result['pattern']}, {len(result['full_layers'])} Full of {result['num_layers']})",
             f"training: {plural(t['steps_done'], 'step')}, mean L_multi {t['first_loss']:.4f} -> {t['last_loss_mean10']:.4f} "
             f"(last 10 steps), {t['steps_skipped']} skipped"]
    if ev:
        se = f" ± {ev['se']:.4f}" if ev["se"] is not None else ""
        lines.append(f"held-out loss with the pattern: {ev['before']:.4f} before, {ev['after']:.4f} after "
                     f"({ev['after_minus_before']:+.4f}{se} nats)")
    _print_result(result, as_json, lines)


def register(app) -> None:
    app.command("dsa-convert")(dsa_convert)
    app.command("distill")(distill)
