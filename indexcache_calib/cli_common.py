"""What every command shares: option declarations (so flags and help agree), the consoles (results on
stdout, progress and errors on stderr) and the error contract (`Error:`/`Hint:` lines, exit codes)."""

from __future__ import annotations

import logging
import os
import shlex
import signal
from contextlib import contextmanager
from typing import Annotated, Optional

import typer
from rich.console import Console

from indexcache_calib.errors import CalibError, Terminated

# transformers and datasets are imported in _quiet_libraries, after it sets HF_HUB_OFFLINE: they import
# huggingface_hub, which reads it once, when imported (see the note at the top of training/convert.py); and `--help`
# and argument errors must not load them (or torch).

Model = Annotated[str, typer.Option("--model", "-m", help="Local checkpoint dir, hub id (from the local HF cache) or alias.")]
Seed = Annotated[int, typer.Option(help="Picks which packed sequences are used.")]
BatchSize = Annotated[int, typer.Option(help="Sequences per forward.")]
TextField = Annotated[str, typer.Option(help="Field / column holding the text.")]
IndexerChunk = Annotated[Optional[int], typer.Option(
    help="Indexer query rows per call (bounds memory at long seq-len). Default: automatic, at most 64 MiB of fp32 scores per call on CPU, an eighth of free memory on a GPU; 0: one call.")]
Attention = Annotated[str, typer.Option(
    help="sparse: top-k attention in bounded memory, no [seq, seq] tensor; dense: the model's own path; auto: sparse where the family allows it.")]
DeviceMap = Annotated[str, typer.Option(help="auto, balanced, sequential, cpu, cuda:N, or a JSON file.")]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")]
MaxMemory = Annotated[Optional[str], typer.Option(help="Per-device limits, e.g. 0=70GiB,1=70GiB,cpu=400GiB.")]
OffloadDir = Annotated[Optional[str], typer.Option(help="Directory for weights offloaded to disk.")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Allow model code shipped inside the checkpoint to run.")]
AllowPickle = Annotated[bool, typer.Option(help="Allow .bin/.pt weights (pickle can run code).")]


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same arguments, quoted, with --resume and
    without --overwrite."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return "indexcache " + shlex.join(args)


def rerun_command(argv: list[str]) -> str:
    """The command line that starts an interrupted run again (nothing was saved): without --resume."""
    return "indexcache " + shlex.join([a for a in argv if a != "--resume"])


out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers  # deferred: see the note at the top
    from datasets.utils.logging import disable_progress_bar as datasets_quiet  # deferred: see the note at the top

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
def handled(interrupted=None):
    """Turn every failure into `Error:`/`Hint:` lines and an exit code; never a traceback
    (set INDEXCACHE_DEBUG=1 to see one). `interrupted()` gives the lines to print on Ctrl-C / SIGTERM."""

    def on_term(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except CalibError as e:
        fail(e.message, e.hint, e.exit_code)
    except (KeyboardInterrupt, Terminated) as e:
        code = EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT
        for line in (interrupted() if interrupted else ["Interrupted."]):
            err.print(line, markup=False)
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


