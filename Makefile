# Everything installs into .venv from the project's own files; `make demo` and `make test` work on a
# fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# A CPU build: a plain `torch` requirement would pull a multi-GB CUDA build. Override on GPU hosts,
# e.g. make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>".
TORCH_SPEC ?= torch==2.13.0
MODEL ?= tiny-dsa
DATA ?= calibration_data/code.jsonl
TARGET ?= 1/4
ARGS ?=
DOMAINS := $(patsubst calibration_data/%.jsonl,%,$(filter-out %.heldout.jsonl,$(wildcard calibration_data/*.jsonl)))

.PHONY: setup demo test calibrate bench long-context paper-table training-evidence clean $(addprefix recalibrate-,$(DOMAINS))

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# The embedded default: the project's trained 16-layer DSA model on the shipped code domain.
demo: setup
	$(BIN)/indexcache calibrate --model tiny-dsa --data calibration_data/code.jsonl --target 1/4 --out outputs/demo --overwrite

test: setup
	$(BIN)/python -m pytest

calibrate: setup
	$(BIN)/indexcache calibrate --model $(MODEL) --data $(DATA) --target $(TARGET) $(ARGS)

# Benchmarks: ratios measured side by side in one run (see docs/search-speed.md and docs/scaling-out.md).
bench: setup
	$(BIN)/python -m indexcache_calib.evidence.bench search
	$(BIN)/python -m indexcache_calib.evidence.bench race
	$(BIN)/python -m indexcache_calib.evidence.bench race --samples 256 --seq-len 128 --tolerance 0.004
	$(BIN)/python -m indexcache_calib.evidence.bench race --samples 32 --seq-len 128 --seeds 0 1 2 3 4 5
	$(BIN)/python -m indexcache_calib.evidence.bench race --model tiny-dsa-deep --samples 16 --seq-len 256 --tolerance 0
	$(BIN)/python -m indexcache_calib.evidence.bench project
	$(BIN)/python -m indexcache_calib.evidence.bench indexer
	$(BIN)/python -m indexcache_calib.evidence.bench parallel
	$(BIN)/python -m indexcache_calib.evidence.bench_long memory
	$(BIN)/python -m indexcache_calib.evidence.bench_long memory --family deepseek_v4
	$(BIN)/python -m indexcache_calib.evidence.bench_long memory --family minimax_m3_vl
	$(BIN)/python -m indexcache_calib.evidence.bench_long plan
	$(BIN)/python -m indexcache_calib.evidence.bench_long plan --config deepseek_v4_flash
	$(BIN)/python -m indexcache_calib.evidence.bench_long plan --config deepseek_v4_pro

# Does calibration length matter? The long model calibrated short and long on both long domains, 4 draws each,
# every pattern scored long on held-out data (see docs/long-context.md). Each calibration resumes if interrupted.
long-context: setup
	$(BIN)/python -m indexcache_calib.evidence.bench_long lengths $(ARGS)

# The small-scale counterpart of the paper's Table 2, plus indexer quality and domain sensitivity.
paper-table: setup
	$(BIN)/python -m indexcache_calib.evidence.paper_table

# dsa-convert on the embedded plain-MLA model and distill on the embedded DSA model, measured on held-out data
# (see docs/training.md). Each stage resumes if interrupted: rerun the same command.
training-evidence: setup
	$(BIN)/python -m indexcache_calib.evidence.training_evidence $(ARGS)

# One target per calibration domain: recalibrate-code, recalibrate-docs, ... Each writes where calibrate
# would by default, and an existing run there is refused as calibrate refuses it: ARGS="--resume" continues
# it, ARGS="--overwrite" starts again. The long domains calibrate the long-context model at its length.
SEQ_LEN ?= 512
$(addprefix recalibrate-,$(filter %-long,$(DOMAINS))): MODEL = tiny-dsa-long
$(addprefix recalibrate-,$(filter %-long,$(DOMAINS))): SEQ_LEN = 4096
$(addprefix recalibrate-,$(DOMAINS)): recalibrate-%: setup
	$(BIN)/indexcache calibrate --model $(MODEL) --data calibration_data/$*.jsonl --seq-len $(SEQ_LEN) --target $(TARGET) $(ARGS)

clean:
	rm -rf outputs/*/ .pytest_cache
