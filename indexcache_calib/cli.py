"""`indexcache` command line: parse options, draw progress on stderr, print results on stdout."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from indexcache_calib import __version__, deploy_cli, inspect_cli
from indexcache_calib.cli_common import (
    EXIT_SIGINT, AllowPickle, Attention, BatchSize, DeviceMap, Dtype, IndexerChunk, MaxMemory, Model, OffloadDir, Seed, TextField,
    TrustRemoteCode, _quiet_libraries, err, handled, out, rerun_command, resume_command,
)
from indexcache_calib.dryrun import describe
from indexcache_calib.errors import plural
from indexcache_calib.training import train_cli

# Commands import calibrate, artifact and deploy (which import torch) inside their functions, so that `--help`
# and argument errors do not load torch.


class _Commands(TyperGroup):
    """Command-line mistakes get the same `Error:`/`Hint:` lines as every other bad input, and a reader
    that closes our stdout early (`| head -1`) is not an error: the run directory holds everything."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = code if isinstance(code, int) else 0
        except typer.Abort:
            code = EXIT_SIGINT
        except typer.TyperException as e:  # the parser's own errors (typer's click)
            if not hasattr(e, "format_message"):
                raise
            err.print(f"Error: {e.format_message()}", markup=False)
            ctx = getattr(e, "ctx", None)
            err.print(f"Hint: see {ctx.command_path if ctx is not None else 'indexcache'} --help", markup=False)
            code = getattr(e, "exit_code", 2)
        except BrokenPipeError:
            # Python would complain again while flushing stdout at exit: point it at /dev/null first.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Calibrate which DSA layers keep their lightning indexer (IndexCache).",
)


def _version(value: bool) -> None:
    if value:
        out.print(f"indexcache {__version__}", markup=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Calibrate which DSA layers keep their lightning indexer (IndexCache)."""


def _interrupted(where: dict, argv: list[str]):
    """What is true after Ctrl-C / SIGTERM: how many steps the checkpoint holds, and how to go on."""

    def lines() -> list[str]:
        from indexcache_calib.artifact import CHECKPOINT

        path = where["run_dir"] / CHECKPOINT if where.get("run_dir") else None
        try:
            steps = len(json.loads(path.read_text())["steps"]) if path is not None and path.is_file() else 0
        except (OSError, ValueError, KeyError, TypeError):
            steps = 0
        if steps:
            return [f"Interrupted: {plural(steps, 'finished search step')} {'is' if steps == 1 else 'are'} saved in {path}.",
                    f"Hint: resume with: {resume_command(argv)}"]
        return ["Interrupted before the first search step finished: nothing was saved.",
                f"Hint: rerun without --resume: {rerun_command(argv)}"]

    return lines


@app.command()
def calibrate(
    model: Model = "tiny-dsa",
    data: str = typer.Option(..., "--data", "-d", help="JSONL (text or messages), .txt, .parquet/.csv, or a saved datasets dir."),
    target: Optional[str] = typer.Option(None, "--target", "-t", show_default="1/4, unless --num-full", help="Share of layers kept full: 1/4, 0.25, 25%."),
    num_full: Optional[int] = typer.Option(None, "--num-full", help="Number of layers kept full (instead of --target)."),
    out_dir: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory (default: outputs/<model>_<data>_<N>F, N the Full layers the target comes to: 1/4 of 16 layers is outputs/<model>_<data>_4F)."),
    seq_len: int = typer.Option(512, help="Tokens per calibration sequence; must exceed the model's index_topk."),
    num_samples: int = typer.Option(8, help="Calibration sequences."),
    seed: Seed = 0,
    batch_size: BatchSize = 1,
    search: str = typer.Option("race", help="race (candidates entered lazily and raced over calibration sequences, with an indifference zone; the default), exact (Algorithm 1's answer bit for bit, prefix reuse) or naive (Algorithm 1, full forwards)."),
    race_alpha: Optional[float] = typer.Option(None, show_default="0.05", help="--search race: chance per step of dropping the best candidate raced, or of a commit more than --tolerance worse than it."),
    race_first: Optional[int] = typer.Option(None, show_default="4", help="--search race: sequences every candidate is scored on first (then 1.25 times as many each round)."),
    tolerance: Optional[str] = typer.Option(None, metavar="NATS|auto", show_default="auto", help="--search race: let a candidate go once it is, at confidence 1 - --race-alpha, at most NATS better than the leader (auto: 0.05% of the loss; 0: none)."),
    text_field: TextField = "text",
    overlap: bool = typer.Option(True, "--overlap/--no-overlap", help="Measure top-k overlap of shared layers (runs their own indexers)."),
    indexer_chunk: IndexerChunk = None,
    attention: Attention = "auto",
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
    objective: str = typer.Option("lm", help="What a pattern is scored on: lm (mean LM loss over every token, the paper's), "
                                  "key-tokens (LM loss on the tokens whose loss the far context lowers, found on all-Full), "
                                  "or retrieval (answer tokens of retrieval probes built from --data; needs --retrieval)."),
    retrieval: Optional[str] = typer.Option(None, "--retrieval", metavar="KINDS", help="--objective retrieval: probe kinds "
                                            "needle, multikey, copy (comma list) or all; --num-samples probes of --seq-len tokens."),
    key_window: Optional[int] = typer.Option(None, show_default="2 x the indexer's budget", help="--objective key-tokens: "
                                             "the short context, in tokens: a key token is scored with between this and twice this many tokens before it."),
    key_margin: float = typer.Option(0.5, help="--objective key-tokens: nats the whole context must lower a token's loss by, against the short window."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the memory and work the run will need, load no weights, and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the layer map as JSON on stdout."),
) -> None:
    """Search which layers keep their indexer and write a layer map."""
    from indexcache_calib.calibrate import Hooks, Options

    opts = Options(
        model=model, data=data, target="1/4" if target is None and num_full is None else target, num_full=num_full, out=out_dir, seq_len=seq_len,
        num_samples=num_samples, seed=seed, batch_size=batch_size, search=search, text_field=text_field,
        overlap=overlap, indexer_chunk=indexer_chunk, cache_device=cache_device, device_map=device_map,
        dtype=dtype, max_memory=max_memory, offload_dir=offload_dir, trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle, resume=resume, overwrite=overwrite, plots=plots,
        start_pattern=start_pattern, cache_budget=cache_budget, race_alpha=race_alpha, race_first=race_first,
        tolerance=tolerance, attention=attention, objective=objective, retrieval=retrieval, key_window=key_window,
        key_margin=key_margin,
    )
    if dry_run:
        with handled():
            _quiet_libraries()
            from indexcache_calib.calibrate import dry_run as plan

            estimate = plan(opts)
        if as_json:
            out.print(json.dumps(estimate, sort_keys=True, indent=2), markup=False)
        else:
            table = Table(title="dry run: nothing was loaded", show_header=False, title_justify="left")
            for key, value in describe(estimate):
                table.add_row(key, value)
            out.print(table)
        return
    where: dict = {}
    with handled(_interrupted(where, sys.argv[1:])):
        _quiet_libraries()
        layer_map, run_dir = _run_calibration(opts, Hooks, where)
    if not layer_map:  # a worker rank of a candidate-parallel run: rank 0 reports
        return
    if as_json:
        out.print(json.dumps(layer_map, sort_keys=True, indent=2), markup=False)
        return
    _print_summary(layer_map, run_dir)


class SearchEta:
    """Time left in a calibration, from this session's work so far: seconds per candidate scored times the
    candidates left in the step; for the search, seconds per decoder-layer forward times the forwards the
    search typically has left (`work`), since the first step, where every candidate runs, costs many later
    ones (without that, seconds per finished step times the steps left). None until there is work to go by."""

    def __init__(self, steps: int, clock=time.monotonic):
        self.clock, self.steps, self.t0 = clock, steps, clock()
        self.steps_done = 0
        self.finished_candidates = 0  # scored in the finished steps of this session
        self.done, self.total = 0, 0  # candidates of the step under way
        self.forwards = None  # (decoder-layer forwards done this session, typically needed in all)

    def work(self, done: int, expected: int) -> None:
        self.forwards = (done, expected)

    def candidate(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def step(self, scored: int) -> None:
        self.steps_done += 1
        self.finished_candidates += scored
        self.done = self.total = 0

    def step_left(self) -> float | None:
        scored = self.finished_candidates + self.done
        if not scored:
            return None
        return (self.clock() - self.t0) / scored * max(0, self.total - self.done)

    def search_left(self) -> float | None:
        if not self.steps_done:
            return None
        if self.steps_done >= self.steps:
            return 0.0
        if self.forwards and self.forwards[0]:
            done, expected = self.forwards
            return (self.clock() - self.t0) / done * max(0, expected - done)
        return (self.clock() - self.t0) / self.steps_done * max(0, self.steps - self.steps_done)


def _clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _run_calibration(opts, Hooks, where: dict):
    """Progress on stderr: on a terminal, bars for the steps, the step's candidates and the sequences of the
    forward under way, each with an ETA from the work so far; on a log or pipe, one line per finished step."""
    from indexcache_calib.calibrate import calibrate as run

    class EtaColumn(ProgressColumn):
        """Counts down to the finish time the last event estimated (`eta_at`); blank on tasks without one."""

        def render(self, task) -> Text:
            if "eta_at" not in task.fields:
                return Text("")
            at = task.fields["eta_at"]
            return Text("eta " + _clock_text(None if at is None else max(0.0, at - time.monotonic())),
                        style="progress.remaining")

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), EtaColumn(),
        console=err, transient=True, disable=not err.is_terminal,  # logs and pipes get the per-step lines only
    )
    tasks: dict = {}

    def at(left: float | None) -> float | None:
        return None if left is None else time.monotonic() + left

    def search_started(steps, first):
        tasks["eta"] = SearchEta(steps)
        tasks["steps"] = progress.add_task("greedy steps", total=steps, eta_at=None)
        tasks["cand"] = progress.add_task("step 1 candidates", total=first, eta_at=None)
        tasks["seq"] = progress.add_task("sequences", total=None)

    def candidate(step, done, total):
        eta = tasks["eta"]
        eta.candidate(done, total)
        progress.update(tasks["cand"], completed=done, total=total, description=f"step {step} candidates",
                        eta_at=at(eta.step_left()))

    def sequences(done, total):
        if "seq" in tasks:
            progress.update(tasks["seq"], completed=done, total=total)

    def work(done, expected):
        if "eta" in tasks:
            tasks["eta"].work(done, expected)

    def step(s):
        eta = tasks["eta"]
        eta.step(len(s.scores))
        progress.update(tasks["steps"], advance=1, eta_at=at(eta.search_left()))
        whole = s.whole
        loss = (f"loss {whole.loss:.5f}" if whole.sequences is None else
                f"delta {s.delta(s.chosen):+.5f} on {plural(len(whole.sequences), 'sequence')}")
        progress.console.print(
            f"step {s.step}: layer {s.chosen} -> S, {s.pattern.count('F')} full, {loss} "
            f"({plural(len(s.scores), 'candidate')} scored)", markup=False,
        )

    hooks = Hooks(
        message=lambda t: err.print(t, markup=False),
        warn=lambda t: err.print(f"Warning: {t}", markup=False),
        search_started=search_started, candidate=candidate, sequences=sequences, step=step, work=work,
        started=lambda d: where.update(run_dir=d),
    )
    with progress:
        return run(opts, hooks)


def search_rows(layer_map: dict) -> list[tuple[str, str]]:
    """The summary's search rows. After a resume the steps and candidates are the whole search's, while the
    layer-forwards and seconds are this session's alone: each row says which it counts."""
    search, env = layer_map["search"], layer_map["environment"]
    work = f"{plural(env['work']['layer_forwards'], 'layer-forward')} in {env['search_seconds']:.1f} s"
    counted = f"{plural(search['steps'], 'step')}, {plural(search['candidates_scored'], 'candidate')} scored"
    session = env.get("session")
    if not env.get("resumed_steps") or session is None:
        return [("search", f"{search['strategy']}: {counted}, {work}")]
    mine = f"{plural(session['steps'], 'step')}, {plural(session['candidates_scored'], 'candidate')} scored"
    return [("search", f"{search['strategy']}, whole search: {counted}"),
            ("this session", f"resumed after step {session['resumed_after_step']}: {mine}, {work}")]


def tolerance_rows(layer_map: dict) -> list[tuple[str, str]]:
    """The race's indifference zone and what it can have given away, for the summary."""
    from indexcache_calib.deploy import tolerance_text

    text = tolerance_text(layer_map.get("search") or {})
    return [("tolerance", text)] if text else []


def _print_summary(layer_map: dict, run_dir) -> None:
    loss = layer_map["loss"]
    table = Table(title="IndexCache layer map", show_header=False, title_justify="left")
    table.add_row("pattern", layer_map["pattern"])
    table.add_row("full layers", f"{layer_map['num_full']} of {layer_map['num_layers']}: {layer_map['full_layers']}")
    objective = layer_map.get("objective") or {"name": "lm"}
    if objective["name"] != "lm":
        from indexcache_calib.objective import describe as describe_objective

        table.add_row("objective", describe_objective(objective))
    table.add_row("loss all-F", f"{loss['all_full']:.5f}")
    table.add_row("loss pattern", f"{loss['final']:.5f} (delta {loss['delta']:+.5f})")
    for key, value in search_rows(layer_map):
        table.add_row(key, value)
    for key, value in tolerance_rows(layer_map):
        table.add_row(key, value)
    out.print(table)
    from indexcache_calib.deploy import undecided_line

    undecided = undecided_line(layer_map["path"])
    if undecided:
        out.print(undecided, markup=False)
    # Plain lines, never wrapped or cut, so they can be copied.
    out.print(f"layer map: {run_dir / 'layer_map.json'}", markup=False)
    from indexcache_calib.deploy import consumers_note, export, lm_family

    family = lm_family(layer_map)
    for engine, label in (("vllm", "vLLM:  "), ("sglang", "SGLang:")):
        if engine in family.engines:
            out.print(f"{label} {export(layer_map, engine)['text']}", markup=False)
    if not {"vllm", "sglang"} & set(family.engines):
        out.print(f"{consumers_note(family)} (indexcache export --engine ...)", markup=False)


def _register_commands() -> None:
    deploy_cli.register(app)
    inspect_cli.register(app)
    train_cli.register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
