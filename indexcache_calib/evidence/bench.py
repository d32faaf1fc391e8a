"""Benchmarks (`make bench`): every number is a ratio measured side by side in one run.

  python -m indexcache_calib.evidence.bench search      naive, exact and race side by side on the trained models
  python -m indexcache_calib.evidence.bench race        race against exact (Algorithm 1's answer), calibration and held-out, per draw
  python -m indexcache_calib.evidence.bench project     every search's work at the paper's scale (from the --dry-run estimates)
  python -m indexcache_calib.evidence.bench indexer     indexer peak memory, chunked vs unchunked, long sequence
  python -m indexcache_calib.evidence.bench parallel    candidate-parallel speedup, 2 processes vs 1
  python -m indexcache_calib.evidence.bench gpu         both searches on random DSA models on a GPU

Results are printed and written as JSON under outputs/bench/. The studies live in bench_search.py (search,
race, project) and bench_scaling.py (indexer, parallel, gpu); this file is their one command line.
"""

from __future__ import annotations

import argparse

from indexcache_calib.evidence import bench_scaling as scaling
from indexcache_calib.evidence import bench_search as search_study
from indexcache_calib.evidence.common import quiet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search")
    s.add_argument("--models", nargs="+", default=list(search_study.SEARCH_CASES),
                   choices=list(search_study.SEARCH_CASES))
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--data", default="calibration_data/code.jsonl")
    rc = sub.add_parser("race")
    rc.add_argument("--model", default=search_study.RACE_CASE[0], help="a model alias or directory")
    rc.add_argument("--seeds", type=int, nargs="+", default=[0], help="one draw of calibration sequences per seed")
    rc.add_argument("--data", default="calibration_data/code.jsonl")
    rc.add_argument("--fresh", action="store_true", help="rerun every search even if outputs/bench/ holds its run")
    rc.add_argument("--samples", type=int, default=None, help=f"calibration sequences (default {search_study.RACE_CASE[1]})")
    rc.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence (default {search_study.RACE_CASE[2]})")
    rc.add_argument("--tolerance", nargs="*", default=[], type=search_study.tolerance,
                    help="race again with each of these tolerances (nats per step, auto, or 0 for none)")
    rc.add_argument("--heldout", default="calibration_data/code.heldout.jsonl")
    sub.add_parser("project")
    i = sub.add_parser("indexer")
    i.add_argument("--seq", type=int, default=8192)
    i.add_argument("--heads", type=int, default=8)
    c = sub.add_parser("_indexer-child")
    c.add_argument("--seq", type=int)
    c.add_argument("--heads", type=int)
    c.add_argument("--chunk", type=int, default=None)
    par = sub.add_parser("parallel")
    par.add_argument("--model", default="tiny-dsa")
    par.add_argument("--data", default="calibration_data/code.jsonl")
    par.add_argument("--seq-len", type=int, default=256)
    par.add_argument("--samples", type=int, default=4)
    g = sub.add_parser("gpu")
    g.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the script itself")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the searches (benchmarks share the host)")
    args = p.parse_args()
    quiet(args.threads)
    if args.cmd == "_indexer-child":
        scaling.indexer_child(args.seq, args.chunk, args.heads)
    else:
        studies = {"search": search_study.bench_search, "race": search_study.bench_race, "project": search_study.bench_project,
                   "indexer": scaling.bench_indexer, "parallel": scaling.bench_parallel, "gpu": scaling.bench_gpu}
        studies[args.cmd](args)


if __name__ == "__main__":
    main()
