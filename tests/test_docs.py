"""docs/ARCHITECTURE.md is the project's map: the README links it and every file it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def test_readme_links_the_architecture() -> None:
    assert "docs/ARCHITECTURE.md" in (ROOT / "README.md").read_text()


def _named_files(text: str) -> set[str]:
    """Paths in backticks that look like project files: `mesh/stage.py`, `stage.py` in a table of
    mesh/, `backends/mlx/`..."""
    names = set(re.findall(r"`((?:apps|mesh|backends|protos|tests|perf|docs)/[\w/.]*)`", text))
    # the token's path is drawn in a code block: its file names carry no backticks
    names |= set(re.findall(r"(?<![\w/])((?:apps|mesh|backends)/[\w/]+\.py)\b", text))
    # the file table of mesh/ names files without their folder
    table = text.split("## The files of a peer", 1)[1].split("\n## ", 1)[0]
    names |= {f"mesh/{n}" for n in re.findall(r"^\| `(\w+\.py)` \|", table, re.M)}
    # files listed as `name.py` after a package heading (backends/, apps/)
    for pkg in ("backends", "apps"):
        m = re.search(rf"`{pkg}/`:(.*?)(?:\n\n|`apps/`:)", text, re.S)
        if m:
            names |= {f"{pkg}/{n}" for n in re.findall(r"`(\w+\.py|\w+/)`", m.group(1))}
    return names


def test_every_named_file_exists() -> None:
    names = _named_files(DOC.read_text())
    assert len(names) > 20, sorted(names)
    missing = sorted(n for n in names if not (ROOT / n.split(" ")[0]).exists())
    assert not missing, f"docs/ARCHITECTURE.md names files that do not exist: {missing}"
