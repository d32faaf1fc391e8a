"""README.md is the user's manual and stays short; the studies are pages under docs/, each linked from it, and
every link in either leads somewhere (a file, and where a link names a section, a heading there). That the
commands they name still run is tests/test_commands.py."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 400
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(path: Path) -> str:
    """The page without its fenced code blocks (a link inside one is code, not a link)."""
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)


def anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", prose(path), flags=re.M)}


def test_the_readme_is_at_most_400_lines():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines: move a study to a page under docs/ and link it"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.split("#")[0]).resolve() for target in LINK.findall(prose(ROOT / "README.md"))
              if not target.startswith(("http://", "https://", "#"))}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_every_link_resolves():
    broken = []
    for page in pages():
        for target in LINK.findall(prose(page)):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, fragment = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and path.suffix == ".md" and fragment not in anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_the_anchor_rule():
    assert anchor("Long runs: checkpoints, resume, interruption") == "long-runs-checkpoints-resume-interruption"
    assert anchor("Is a step decided?") == "is-a-step-decided"
    assert anchor("Training the indexers: `dsa-convert` and `distill`") == "training-the-indexers-dsa-convert-and-distill"
