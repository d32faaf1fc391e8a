"""Training the lightning indexers: `indexcache dsa-convert` and `indexcache distill` (train_cli.py parses
their options; convert.py, distill.py, the resumable loop in trainloop.py and the math in warmup.py do the
work). Built on the calibration tool at the package top, which imports nothing from here except the
command-line module that registers the two commands."""
