"""The benchmarks and evidence behind the numbers in README.md and docs/: `python -m
indexcache_calib.evidence.bench`, `.bench_long`, `.paper_table` and `.training_evidence`. They use the
calibration tool and the training commands; neither imports anything from here."""
