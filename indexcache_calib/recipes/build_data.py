"""Rebuild `calibration_data/`: two domains of real, redistributable text.

- code: Python source files from a CPython 3.11 standard library (PSF License).
- docs: English prose from GNU Info manuals that are under the GNU FDL with no
  Invariant Sections, one document per Info node, with the Info markup removed.

Each domain gets `<domain>.jsonl` (calibration/training split) and
`<domain>.heldout.jsonl`, one `{"id", "text"}` object per line. The build is
deterministic: inputs are walked in sorted order, documents are chosen and split
by SHA-256 of their id (no random numbers), and output is written sorted by id.

A long-context split per domain, `<domain>-long.jsonl` and `<domain>-long.heldout.jsonl`,
holds long documents from the same sources, for calibration at thousands of tokens:
whole standard-library files over the short split's size cap (so never in it), and
chapters of consecutive Info nodes in manual order. Long held-out text shares no
document with any calibration split, short or long, and long calibration text none
with the short held-out split.

    python -m indexcache_calib.recipes.build_data [--python-root DIR] [--info-root DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "calibration_data"
PYTHON_ROOTS = ("/root/.pyenv/versions/3.11.7/lib/python3.11", "/usr/lib/python3.11")
INFO_ROOT = "/usr/share/info"
# Text bytes per domain (both splits); the JSONL files come out slightly larger.
DEFAULT_BUDGET = 1_250_000
DEFAULT_HELDOUT_PERCENT = 15

# Tests, generated tables and bundled third-party code are not representative source.
CODE_SKIP_DIRS = {
    "test", "tests", "idle_test", "site-packages", "__pycache__", "lib-dynload",
    "encodings", "pydoc_data", "ensurepip",
}
CODE_MIN_BYTES, CODE_MAX_BYTES = 1_000, 32_000
DOCS_MIN_CHARS = 400
# Long split: whole files longer than the short split's cap (and no bigger than this), and Info
# chapters of at least DOCS_LONG_MIN_CHARS of consecutive nodes. Per domain, about LONG_HELDOUT_BYTES
# of held-out text first, then calibration text up to LONG_BUDGET bytes in all.
CODE_LONG_MAX_BYTES = 128_000
CODE_LONG_SKIP = {"html/entities.py"}  # a generated table
DOCS_LONG_MIN_CHARS = 40_000
LONG_MIN_CHARS = 16_000  # a long document shorter than this, once filtered, is left out
LONG_BUDGET = 1_200_000
LONG_HELDOUT_BYTES = 360_000
# Index, licence and copying nodes are lists or legal text, not documentation prose.
DOCS_SKIP_NODE = re.compile(r"^top$|index|licen[cs]e|copying|\bfdl\b|\bgpl\b", re.IGNORECASE)


def _hash(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


def _python_files(python_root: str | Path, keep) -> dict[str, str]:
    """Standard-library `.py` files keyed by their path relative to `python_root`, where
    `keep(relative path, size in bytes)` says so."""
    root = Path(python_root)
    docs: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in CODE_SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        data = path.read_bytes()
        if not keep(rel.as_posix(), len(data)):
            continue
        try:
            docs[rel.as_posix()] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return docs


def code_documents(python_root: str | Path) -> dict[str, str]:
    """Standard-library `.py` files of CODE_MIN_BYTES to CODE_MAX_BYTES."""
    return _python_files(python_root, lambda rel, size: CODE_MIN_BYTES <= size <= CODE_MAX_BYTES)


def long_code_documents(python_root: str | Path) -> dict[str, str]:
    """Standard-library files over CODE_MAX_BYTES (never in the short split) up to CODE_LONG_MAX_BYTES."""
    return _python_files(python_root, lambda rel, size: rel not in CODE_LONG_SKIP and CODE_MAX_BYTES < size <= CODE_LONG_MAX_BYTES)


def docs_chapters(manuals: dict[str, dict]) -> dict[str, list[str]]:
    """Runs of consecutive nodes in manual order, each of at least DOCS_LONG_MIN_CHARS (a short tail joins
    the run before it), keyed `<manual>/<first node>`; values are the node ids `<manual>/<node>` in order."""
    chapters: dict[str, list[str]] = {}
    for manual, info in manuals.items():
        runs: list[list[str]] = []
        run, size = [], 0
        for node, text in info["nodes"].items():
            run.append(node)
            size += len(text)
            if size >= DOCS_LONG_MIN_CHARS:
                runs.append(run)
                run, size = [], 0
        if run:
            if runs:
                runs[-1].extend(run)
            else:
                runs.append(run)
        for r in runs:
            chapters[f"{manual}/{r[0]}"] = [f"{manual}/{n}" for n in r]
    return chapters


def long_split(units: dict[str, list[str]], domain: str, texts: dict[str, str], heldout_bytes: int,
               budget_bytes: int, exclude_heldout: set[str] = frozenset(), exclude_calib: set[str] = frozenset()):
    """Held-out long documents first (in order of SHA-256 of `"<domain>/long-heldout/<id>"`, until about
    `heldout_bytes`), then calibration ones in order of `"<domain>/long-select/<id>"` up to `budget_bytes`
    in all. A unit is a list of part ids (`texts` holds the parts): a file, or a chapter's nodes; a held-out unit leaves
    out the parts in `exclude_heldout`, a calibration unit the parts in `exclude_calib`; parts are joined
    by a blank line and units shorter than LONG_MIN_CHARS once filtered are left out."""
    def text_of(unit, exclude):
        return "\n".join(texts[p] for p in unit if p not in exclude)

    heldout, calib, total = [], [], 0
    held_ids: set[str] = set()
    for uid in sorted(units, key=lambda u: _hash(domain, "long-heldout", u)):
        if total >= heldout_bytes:
            break
        text = text_of(units[uid], exclude_heldout)
        if len(text) >= LONG_MIN_CHARS:
            heldout.append({"id": uid, "text": text})
            held_ids.add(uid)
            total += len(text.encode())
    for uid in sorted(units, key=lambda u: _hash(domain, "long-select", u)):
        if total >= budget_bytes:
            break
        if uid in held_ids:
            continue
        text = text_of(units[uid], exclude_calib)
        if len(text) >= LONG_MIN_CHARS:
            calib.append({"id": uid, "text": text})
            total += len(text.encode())
    return sorted(calib, key=lambda r: r["id"]), sorted(heldout, key=lambda r: r["id"])


_INFO_NAME = re.compile(r"^(?P<manual>.+?)\.info(?:-(?P<part>\d+))?(?:\.gz)?$")
_XREF_SHORT = re.compile(r"\*([Nn])ote\s+([^:]*?)::")
_XREF_LONG = re.compile(r"\*([Nn])ote\s+([^:]*?):\s+(?:\([^)]*\))?[^.,]*?([.,])")
_UNDERLINE = re.compile(r"^\s*([*=\-.])\1{2,}\s*$")
_INDEX_MARK = re.compile(r"\x00\x08\[[^\x00]*\x00\x08\]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _read_text(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def strip_info(body: str) -> str:
    """Info node body -> plain prose: no menus, cross-reference syntax or heading rules."""
    body = _CONTROL.sub("", _INDEX_MARK.sub("", body))

    def xref(m: re.Match) -> str:
        label = " ".join(m.group(2).split())
        tail = m.group(3) if m.lastindex and m.lastindex >= 3 else ""
        return ("See " if m.group(1) == "N" else "see ") + label + (tail or "")

    body = _XREF_SHORT.sub(xref, body)
    body = _XREF_LONG.sub(xref, body)
    body = re.sub(r"\b([Ss]ee) see ", r"\1 ", body)  # "see *note X::" reads "see see X" otherwise
    out: list[str] = []
    in_menu_entry = False
    for line in body.split("\n"):
        line = line.rstrip()
        if line == "* Menu:" or (line.startswith("* ") and ":" in line):
            in_menu_entry = True
            continue
        # A menu entry's description wraps onto deeply indented lines.
        if in_menu_entry and line and len(line) - len(line.lstrip()) >= 16:
            continue
        in_menu_entry = False
        if _UNDERLINE.match(line):
            continue
        out.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out))
    return text.strip() + "\n"


def info_manuals(info_root: str | Path) -> dict[str, dict]:
    """Manuals under `info_root` whose copying notice grants the GFDL with no Invariant Sections.

    Returns {manual: {"copyright": [...], "nodes": {node_name: stripped_text}, "gfdl": text|None,
    "gfdl_version": "1.2"|"1.3"}}.
    """
    parts: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(Path(info_root).iterdir()):
        m = _INFO_NAME.match(path.name)
        if m and path.is_file():
            parts.setdefault(m.group("manual"), []).append((int(m.group("part") or 0), path))
    manuals: dict[str, dict] = {}
    for manual in sorted(parts):
        chunks = [_read_text(p) for _, p in sorted(parts[manual])]
        preamble = chunks[0].split("\x1f", 1)[0]
        notice = " ".join(preamble.split())
        if "GNU Free Documentation License" not in notice or "no Invariant Sections" not in notice:
            continue
        # Copyright statements wrap over lines: keep each whole paragraph that starts with one.
        copyright_lines = [" ".join(par.split()) for par in re.split(r"\n\s*\n", preamble)
                           if par.strip().startswith("Copyright")]
        version = re.search(r"Free Documentation License[^.]*?[Vv]ersion (1\.\d)", notice)
        nodes: dict[str, str] = {}
        gfdl = None
        for chunk in "\x1f".join(chunks).split("\x1f"):
            chunk = chunk.lstrip("\n")
            header, _, body = chunk.partition("\n")
            m = re.search(r"Node:\s*([^,\n]+)", header)
            if not header.startswith("File:") or not m:
                continue  # preamble, indirect table or tag table
            name = m.group(1).strip()
            if name == "GNU Free Documentation License" and gfdl is None:
                gfdl = strip_info(body)
            if DOCS_SKIP_NODE.search(name) or name in nodes:
                continue
            text = strip_info(body)
            if len(text) >= DOCS_MIN_CHARS:
                nodes[name] = text
        manuals[manual] = {"copyright": copyright_lines, "nodes": nodes, "gfdl": gfdl,
                           "gfdl_version": version.group(1) if version else "1.3"}
    return manuals


def select_and_split(docs: dict[str, str], domain: str, budget_bytes: int, heldout_percent: int):
    """Choose documents up to `budget_bytes` in hash order, then split them by a second hash.

    Hash order spreads the choice over the whole source tree; the split hash is independent
    of the choice, so a document's split never changes with the budget. Identical texts are
    kept once so the held-out split cannot contain a copy of a calibration document.
    """
    seen: set[str] = set()
    unique = {}
    for doc_id in sorted(docs):
        digest = hashlib.sha256(docs[doc_id].encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            unique[doc_id] = docs[doc_id]
    chosen, total = [], 0
    for doc_id in sorted(unique, key=lambda d: _hash(domain, "select", d)):
        if total >= budget_bytes:
            break
        chosen.append(doc_id)
        total += len(unique[doc_id].encode())
    calib, heldout = [], []
    for doc_id in sorted(chosen):
        held = int(_hash(domain, "split", doc_id)[:8], 16) % 100 < heldout_percent
        (heldout if held else calib).append({"id": doc_id, "text": unique[doc_id]})
    return calib, heldout


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")


def _file_stats(path: Path, n_docs: int) -> dict:
    data = path.read_bytes()
    return {"file": path.name, "documents": n_docs, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def build(out_dir: str | Path, python_root: str | Path, info_root: str | Path,
          budget_bytes: int = DEFAULT_BUDGET, heldout_percent: int = DEFAULT_HELDOUT_PERCENT,
          long_budget_bytes: int = LONG_BUDGET, long_heldout_bytes: int = LONG_HELDOUT_BYTES) -> dict:
    """Write both domains, licence texts and README.md into `out_dir`; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, list[dict]] = {}

    code = code_documents(python_root)
    if not code:
        raise SystemExit(f"no Python source found under {python_root}")
    for split_name, records in zip(("", ".heldout"), select_and_split(code, "code", budget_bytes, heldout_percent)):
        write_jsonl(out / f"code{split_name}.jsonl", records)
        summary.setdefault("code", []).append(_file_stats(out / f"code{split_name}.jsonl", len(records)))
    long_code = long_code_documents(python_root)
    for split_name, records in zip(("", ".heldout"), long_split({d: [d] for d in long_code}, "code", long_code, long_heldout_bytes,
                                                                long_budget_bytes)):
        write_jsonl(out / f"code-long{split_name}.jsonl", records)
        summary.setdefault("code-long", []).append(_file_stats(out / f"code-long{split_name}.jsonl", len(records)))
    psf = Path(python_root) / "LICENSE.txt"
    psf_notice = "Copyright (c) 2001 Python Software Foundation; All Rights Reserved"
    if psf.is_file():
        psf_text = psf.read_text(encoding="utf-8")
        (out / "LICENSE.PSF.txt").write_text(psf_text, encoding="utf-8")
        m = re.search(r'"(Copyright \(c\) 2001.*?Python Software Foundation; All Rights Reserved)"', " ".join(psf_text.split()))
        psf_notice = m.group(1) if m else psf_notice

    manuals = info_manuals(info_root)
    docs = {f"{m}/{node}": text for m, info in manuals.items() for node, text in info["nodes"].items()}
    if not docs:
        raise SystemExit(f"no GFDL Info manual found under {info_root}")
    short_ids = {}
    for split_name, records in zip(("", ".heldout"), select_and_split(docs, "docs", budget_bytes, heldout_percent)):
        write_jsonl(out / f"docs{split_name}.jsonl", records)
        summary.setdefault("docs", []).append(_file_stats(out / f"docs{split_name}.jsonl", len(records)))
        short_ids[split_name] = {r["id"] for r in records}
    # Long held-out chapters leave out the nodes of the short calibration split, long calibration
    # chapters those of the short held-out split.
    for split_name, records in zip(("", ".heldout"), long_split(docs_chapters(manuals), "docs", docs, long_heldout_bytes,
                                                                long_budget_bytes, exclude_heldout=short_ids[""],
                                                                exclude_calib=short_ids[".heldout"])):
        write_jsonl(out / f"docs-long{split_name}.jsonl", records)
        summary.setdefault("docs-long", []).append(_file_stats(out / f"docs-long{split_name}.jsonl", len(records)))
    gfdl = next((info["gfdl"] for info in manuals.values() if info["gfdl"]), None)
    if gfdl:
        (out / "LICENSE.GFDL.txt").write_text(gfdl, encoding="utf-8")

    used = sorted({r.split("/", 1)[0] for r in docs})
    (out / "README.md").write_text(_readme(summary, python_root, info_root, manuals, used, psf_notice,
                                           budget_bytes, heldout_percent, long_budget_bytes, long_heldout_bytes),
                                   encoding="utf-8")
    return summary


def _readme(summary, python_root, info_root, manuals, used, psf_notice, budget_bytes, heldout_percent,
            long_budget_bytes=LONG_BUDGET, long_heldout_bytes=LONG_HELDOUT_BYTES) -> str:
    rows = []
    for domain, files in summary.items():
        for s in files:
            rows.append(f"| {domain} | `{s['file']}` | {s['documents']} | {s['bytes']:,} | `{s['sha256']}` |")
    copyrights = "\n".join(
        f"  - `{m}` (GFDL {manuals[m]['gfdl_version']} or later): "
        + ("; ".join(manuals[m]["copyright"]) or "Free Software Foundation, Inc.") for m in used
    )
    return f"""# Calibration data

Two domains of real text, written by others and redistributable, used to calibrate
IndexCache patterns and to train the tiny checkpoints in `indexcache_calib/models/`.
Rebuild with `python -m indexcache_calib.recipes.build_data`; the build is deterministic,
so a rebuild from the same sources reproduces these files byte for byte.

Format: one JSON object per line, `{{"id": ..., "text": ...}}`, one document per line,
sorted by `id`. `<domain>.jsonl` is the calibration (and training) split;
`<domain>.heldout.jsonl` holds disjoint documents for evaluation.

| domain | file | documents | bytes | sha256 |
|---|---|---|---|---|
{chr(10).join(rows)}

Selection: documents are taken in order of SHA-256 of `"<domain>/select/<id>"` until about
{budget_bytes:,} bytes of text per domain; each is held out when the first 32 bits of
SHA-256 of `"<domain>/split/<id>"` modulo 100 are below {heldout_percent}. Texts that occur twice are kept once.

## Long documents: `<domain>-long.jsonl` and `<domain>-long.heldout.jsonl`

For calibration and evaluation at long sequence lengths (thousands of tokens), where the short
splits' documents (a few hundred to a few thousand tokens each) would pack many unrelated texts
into one sequence. Same sources and licences as below; the make target is `recalibrate-<domain>-long`.

- code-long: whole standard-library files of more than {CODE_MAX_BYTES:,} and at most {CODE_LONG_MAX_BYTES:,} bytes
  (so none is in the short code split), with the short split's exclusions and `{", ".join(sorted(CODE_LONG_SKIP))}` (a generated table).
- docs-long: chapters of one manual, runs of consecutive Info nodes in the manual's order of at least
  {DOCS_LONG_MIN_CHARS:,} characters (a shorter tail joins the run before it), nodes cleaned as below and
  separated by a blank line; `id` is `<manual>/<first node>`. A held-out chapter leaves out the nodes
  that are in `docs.jsonl`, a calibration chapter those in `docs.heldout.jsonl`, so no held-out node,
  short or long, is in any calibration file (paragraphs a manual repeats in several nodes, such as
  shared option descriptions, can still occur on both sides, as in the short split). A chapter leaves
  a gap where a node was left out; calibration chapters repeat nodes of `docs.jsonl`.
- Selection: held-out documents first, in order of SHA-256 of `"<domain>/long-heldout/<id>"`, until about
  {long_heldout_bytes:,} bytes; then calibration documents in order of SHA-256 of `"<domain>/long-select/<id>"`
  until about {long_budget_bytes:,} bytes in all. Documents under {LONG_MIN_CHARS:,} characters (after
  leaving out nodes) are left out.

## code: Python standard library source

- Source: the `.py` files of the CPython 3.11 standard library at `{python_root}`,
  excluding test suites, `site-packages`, `encodings`, `pydoc_data`, `ensurepip`, generated
  `_sysconfigdata*` files, and files under {CODE_MIN_BYTES:,} or over {CODE_MAX_BYTES:,} bytes.
- `id` is the path relative to that directory; `text` is the file unchanged.
- Licence: Python Software Foundation License Version 2 (the standard library's licence).
  {psf_notice}.
  The full licence text, as shipped with that Python, is in `LICENSE.PSF.txt`.

## docs: GNU Info manuals

- Source: the Info manuals under `{info_root}` whose copying notice grants the
  GNU Free Documentation License with no Invariant Sections, no Front-Cover Texts and
  no Back-Cover Texts. Manuals used: {", ".join(f"`{m}`" for m in used)}.
- One document per Info node; `id` is `<manual>/<node name>`. Top, index, licence and
  copying nodes and nodes under {DOCS_MIN_CHARS} characters are left out.
- Modification: the text is the node's text with the Info markup removed (node header
  lines, menus, `*note` cross-reference syntax reduced to "see <label>", heading
  underlines, index markers); the wording is otherwise unchanged.
- Licence: GNU Free Documentation License, version 1.2 or 1.3 "or any later version" as each
  manual's notice says (below). `LICENSE.GFDL.txt` holds version 1.3, as included in the
  manuals, which every one of these notices permits. Copyright notices:
{copyrights}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python-root", default=next((r for r in PYTHON_ROOTS if Path(r).is_dir()), PYTHON_ROOTS[0]),
                   help="CPython standard library directory (default: %(default)s)")
    p.add_argument("--info-root", default=INFO_ROOT, help="directory of GNU Info manuals (default: %(default)s)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default: calibration_data/)")
    p.add_argument("--budget-bytes", type=int, default=DEFAULT_BUDGET, help="text bytes per domain")
    p.add_argument("--heldout-percent", type=int, default=DEFAULT_HELDOUT_PERCENT)
    p.add_argument("--long-budget-bytes", type=int, default=LONG_BUDGET, help="text bytes per domain of the long split")
    p.add_argument("--long-heldout-bytes", type=int, default=LONG_HELDOUT_BYTES,
                   help="text bytes per domain of the long held-out split")
    args = p.parse_args(argv)
    summary = build(args.out, args.python_root, args.info_root, args.budget_bytes, args.heldout_percent,
                    args.long_budget_bytes, args.long_heldout_bytes)
    for domain, files in summary.items():
        for s in files:
            print(f"{domain:9s} {s['file']:26s} {s['documents']:5d} docs {s['bytes']:>10,} bytes  sha256 {s['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
