"""Every section of docs/method.md that the code, configs and README cite exists there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHOD = REPO / "docs" / "method.md"
SOURCES = ("system", "workers", "pipelines", "benchmarks", "configs", "tests", "infra", "docs")
ROOT_FILES = ("README.md", "pyproject.toml", "Makefile")
STEP = r"(?: steps? [\d-]+)?"
CITATION = re.compile(
    rf"docs/method\.md (§[a-e](?:\.\d+)?(?:-[a-e]\.\d+)?{STEP}(?:, §[a-e]\.\d+(?:-[a-e]\.\d+)?{STEP})*)"
)
SECTION_ID = re.compile(r"[§-]([a-e](?:\.\d+)?)")


def _sections() -> set[str]:
    """Ids of the headings (``## (a) ...``, ``### a.1 ...``) and of section (e)'s numbered entries."""
    ids, part = set(), None
    for line in METHOD.read_text().splitlines():
        if m := re.match(r"## \(([a-e])\) ", line):
            part = m.group(1)
            ids.add(part)
        elif m := re.match(r"### ([a-e]\.\d+) ", line):
            ids.add(m.group(1))
        elif part == "e" and (m := re.match(r"(\d+)\. ", line)):
            ids.add(f"e.{m.group(1)}")
    return ids


def _texts():
    files = [REPO / name for name in ROOT_FILES if (REPO / name).exists()]
    for folder in SOURCES:
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in {".py", ".md", ".yaml", ".toml"}]
    for path in files:
        if path == Path(__file__).resolve():
            continue
        yield path.relative_to(REPO), path.read_text(encoding="utf-8")


def test_every_cited_section_of_the_method_exists():
    sections = _sections()
    cited = {
        (str(path), section)
        for path, text in _texts()
        for citation in CITATION.findall(text)
        for section in SECTION_ID.findall(citation)
    }
    assert len(cited) > 40, "the scan should find the code's citations"
    assert [c for c in sorted(cited) if c[1] not in sections] == []


def test_nothing_cites_a_method_document_outside_the_repository():
    stale = re.compile(r"SPEC-clustercam|\bspec [a-e]\.\d|\.\./shared", re.IGNORECASE)
    assert [str(path) for path, text in _texts() if stale.search(text)] == []
