"""`indexcache` command line: parse options, draw progress on stderr, print results on stdout."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from indexcache_calib.cli_options import (
    AllowPickle, BatchSize, DeviceMap, Dtype, IndexerChunk, MaxMemory, Model, OffloadDir, Seed, TextField, TrustRemoteCode,
)
from indexcache_calib.errors import CalibError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Calibrate which DSA layers keep their lightning indexer (IndexCache).",
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_SIGINT, EXIT_SIGTERM = 130, 143


@app.callback()
def _root() -> None:
    """Calibrate which DSA layers keep their lightning indexer (IndexCache)."""


class _Terminated(Exception):
    pass


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    from datasets.utils.logging import disable_progress_bar as datasets_quiet

    import logging

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets_quiet()


def fail(message: str, hint: str | None = None, code: int = 2) -> None:
    err.print(f"Error: {message}", markup=False)
    if hint:
        err.print(f"Hint: {hint}", markup=False)
    raise typer.Exit(code)


@contextmanager
def handled(resume_hint: str | None = None):
    """Turn every failure into `Error:`/`Hint:` lines and an exit code; never a traceback
    (set INDEXCACHE_DEBUG=1 to see one)."""

    def on_term(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except CalibError as e:
        fail(e.message, e.hint, e.exit_code)
    except (KeyboardInterrupt, _Terminated) as e:
        code = EXIT_SIGTERM if isinstance(e, _Terminated) else EXIT_SIGINT
        err.print("Interrupted: every finished search step is saved in the checkpoint.", markup=False)
        if resume_hint:
            err.print(f"Hint: resume with: {resume_hint}", markup=False)
        raise typer.Exit(code)
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - the last line of defence for the one-line contract
        if os.environ.get("INDEXCACHE_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        fail(f"internal error: {type(e).__name__}: {first}", "rerun with INDEXCACHE_DEBUG=1 for a traceback, and report it", 1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resume_command(argv: list[str]) -> str:
    args = [a for a in argv if a not in ("--overwrite",)]
    if "--resume" not in args:
        args.append("--resume")
    return "indexcache " + " ".join(args)


@app.command()
def calibrate(
    model: Model = "tiny-dsa",
    data: str = typer.Option(..., "--data", "-d", help="JSONL (text or messages), .txt, .parquet/.csv, or a saved datasets dir."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Share of layers kept full: 1/4, 0.25, 25%."),
    num_full: Optional[int] = typer.Option(None, "--num-full", help="Number of layers kept full (instead of --target)."),
    out_dir: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory (default: outputs/<model>_<data>_<target>)."),
    seq_len: int = typer.Option(512, help="Tokens per calibration sequence; must exceed the model's index_topk."),
    num_samples: int = typer.Option(8, help="Calibration sequences."),
    seed: Seed = 0,
    batch_size: BatchSize = 1,
    search: str = typer.Option("fast", help="fast (prefix reuse + lazy re-scoring), race (Algorithm 1's candidates raced over calibration sequences), exact (Algorithm 1's answer bit for bit, prefix reuse only) or naive (Algorithm 1, full forwards)."),
    race_alpha: float = typer.Option(0.05, help="--search race: chance per step of dropping the candidate Algorithm 1 would choose."),
    race_first: int = typer.Option(4, help="--search race: sequences every candidate is scored on first (then doubling)."),
    text_field: TextField = "text",
    overlap: bool = typer.Option(True, "--overlap/--no-overlap", help="Measure top-k overlap of shared layers (runs their own indexers)."),
    indexer_chunk: IndexerChunk = None,
    cache_device: str = typer.Option("cpu", help="Where cached layer inputs live: cpu, gpu, disk, or none."),
    cache_budget: Optional[str] = typer.Option(None, help="Most memory the layer-input cache may take (e.g. 64GiB); past it the cache goes to disk."),
    device_map: DeviceMap = "auto",
    dtype: Dtype = "auto",
    max_memory: MaxMemory = None,
    offload_dir: OffloadDir = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace the results already in --out."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots next to the layer map."),
    start_pattern: Optional[str] = typer.Option(None, help="Start the search from this F/S pattern instead of all-F."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the memory and work the run will need, load no weights, and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the layer map as JSON on stdout."),
) -> None:
    """Search which layers keep their indexer and write a layer map."""
    from indexcache_calib.calibrate import Hooks, Options

    opts = Options(
        model=model, data=data, target=target, num_full=num_full, out=out_dir, seq_len=seq_len,
        num_samples=num_samples, seed=seed, batch_size=batch_size, search=search, text_field=text_field,
        overlap=overlap, indexer_chunk=indexer_chunk, cache_device=cache_device, device_map=device_map,
        dtype=dtype, max_memory=max_memory, offload_dir=offload_dir, trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle, resume=resume, overwrite=overwrite, plots=plots,
        start_pattern=start_pattern, cache_budget=cache_budget, race_alpha=race_alpha, race_first=race_first,
    )
    if target is None and num_full is None:
        opts.target = "1/4"
    if dry_run:
        with handled():
            _quiet_libraries()
            from indexcache_calib.calibrate import dry_run as plan
            from indexcache_calib.dryrun import describe

            estimate = plan(opts)
        if as_json:
            out.print(json.dumps(estimate, sort_keys=True, indent=2), markup=False)
        else:
            table = Table(title="dry run: nothing was loaded", show_header=False, title_justify="left")
            for key, value in describe(estimate):
                table.add_row(key, value)
            out.print(table)
        return
    with handled(_resume_command(sys.argv[1:])):
        _quiet_libraries()
        layer_map, run_dir = _run_calibration(opts, Hooks)
    if not layer_map:  # a worker rank of a candidate-parallel run: rank 0 reports
        return
    if as_json:
        out.print(json.dumps(layer_map, sort_keys=True, indent=2), markup=False)
        return
    _print_summary(layer_map, run_dir)


def _run_calibration(opts, Hooks):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from indexcache_calib.calibrate import calibrate as run

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True,
        disable=not err.is_terminal,  # logs and pipes get the per-step lines only
    )
    tasks: dict = {}

    def search_started(steps, first):
        tasks["steps"] = progress.add_task("greedy steps", total=steps)
        tasks["cand"] = progress.add_task("candidates", total=first)

    def candidate(step, done, total):
        progress.update(tasks["cand"], completed=done, total=total, description=f"step {step} candidates")

    def step(s):
        progress.advance(tasks["steps"])
        progress.console.print(
            f"step {s.step}: layer {s.chosen} -> S, {s.pattern.count('F')} full, loss {s.loss:.5f} "
            f"({len(s.scores)} candidates scored)", markup=False,
        )

    hooks = Hooks(
        message=lambda t: err.print(t, markup=False),
        warn=lambda t: err.print(f"Warning: {t}", markup=False),
        search_started=search_started, candidate=candidate, step=step,
    )
    with progress:
        return run(opts, hooks)


def _print_summary(layer_map: dict, run_dir) -> None:
    loss = layer_map["loss"]
    table = Table(title="IndexCache layer map", show_header=False, title_justify="left")
    table.add_row("pattern", layer_map["pattern"])
    table.add_row("full layers", f"{layer_map['num_full']} of {layer_map['num_layers']}: {layer_map['full_layers']}")
    table.add_row("loss all-F", f"{loss['all_full']:.5f}")
    table.add_row("loss pattern", f"{loss['final']:.5f} (delta {loss['delta']:+.5f})")
    search, work = layer_map["search"], layer_map["environment"]["work"]
    table.add_row("search", f"{search['strategy']}: {search['steps']} steps, {search['candidates_scored']} candidates scored, {work['layer_forwards']} layer-forwards")
    out.print(table)
    from indexcache_calib.deploy import undecided_line

    undecided = undecided_line(layer_map["path"])
    if undecided:
        out.print(undecided, markup=False)
    # Plain lines, never wrapped or cut, so they can be copied.
    out.print(f"layer map: {run_dir / 'layer_map.json'}", markup=False)
    out.print(f"vLLM:   vllm serve MODEL {layer_map['engines']['vllm']['args']}", markup=False)
    out.print(f"SGLang: python -m sglang.launch_server --model-path MODEL {layer_map['engines']['sglang']['args']}", markup=False)


def _register_commands() -> None:
    from indexcache_calib import deploy_cli, inspect_cli

    deploy_cli.register(app)
    inspect_cli.register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
