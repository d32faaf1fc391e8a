"""Command-line options shared by several commands, declared once so their flags and help agree."""

from typing import Annotated, Optional

import typer

Model = Annotated[str, typer.Option("--model", "-m", help="Local checkpoint dir, hub id (from the local HF cache) or alias.")]
Seed = Annotated[int, typer.Option(help="Picks which packed sequences are used.")]
BatchSize = Annotated[int, typer.Option(help="Sequences per forward.")]
TextField = Annotated[str, typer.Option(help="Field / column holding the text.")]
IndexerChunk = Annotated[Optional[int], typer.Option(
    help="Indexer query rows per call (bounds memory at long seq-len). Default: automatic, at most 1 GiB of fp32 scores per call; 0: one call.")]
DeviceMap = Annotated[str, typer.Option(help="auto, balanced, sequential, cpu, cuda:N, or a JSON file.")]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")]
MaxMemory = Annotated[Optional[str], typer.Option(help="Per-device limits, e.g. 0=70GiB,1=70GiB,cpu=400GiB.")]
OffloadDir = Annotated[Optional[str], typer.Option(help="Directory for weights offloaded to disk.")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Allow model code shipped inside the checkpoint to run.")]
AllowPickle = Annotated[bool, typer.Option(help="Allow .bin/.pt weights (pickle can run code).")]
