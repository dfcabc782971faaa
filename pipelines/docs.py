"""Regenerate the README's reference sections from the code, so the documentation cannot drift.

    python -m pipelines.docs            # rewrite README.md between the markers
    python -m pipelines.docs --check    # exit 1 and name the section when README.md is stale (tests do this)

Two sections are generated: the config reference (every key of every entry point's typed config,
with its type, default and meaning, from ``system.config.markdown_table``) and the metrics table
(every Prometheus metric the jobs register, from ``system.telemetry``). Each lives between
``<!-- generated:NAME -->`` and ``<!-- end:NAME -->``; the text around them is written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from pipelines.evaluate import EvaluateConfig
from pipelines.export import ExportConfig
from pipelines.ingest import IngestConfig
from pipelines.select import SelectConfig
from system.config import markdown_table
from system.label.config import LabelConfig
from system.telemetry import ingest_metrics, label_metrics, train_metrics
from system.training import TrainConfig

README = Path(__file__).resolve().parent.parent / "README.md"

# (entry point, typed config, where it is declared)
CONFIGS = (
    ("pipelines.ingest", IngestConfig, "pipelines/ingest.py"),
    ("pipelines.train", TrainConfig, "system/training.py"),
    ("pipelines.label", LabelConfig, "system/label/config.py"),
    ("pipelines.evaluate", EvaluateConfig, "pipelines/evaluate.py"),
    ("pipelines.export", ExportConfig, "pipelines/export.py"),
    ("pipelines.select", SelectConfig, "pipelines/select.py"),
)

_SAMPLE_SUFFIX = {"counter": "_total", "gauge": "", "histogram": "_bucket / _sum / _count", "summary": "_sum / _count"}


def _escape_doc_cells(table: str) -> str:
    """Escape ``|`` inside the last (free text) cell of each row: docs say ``voc | coco``."""
    rows = []
    for row in table.splitlines():
        cells = row.split(" | ", 3)
        if len(cells) == 4:
            cells[3] = cells[3][:-2].replace("|", "\\|") + " |"
        rows.append(" | ".join(cells))
    return "\n".join(rows)


def config_reference() -> str:
    parts = []
    for module, cls, where in CONFIGS:
        parts.append(
            f"#### `python -m {module}` ({cls.__name__}, `{where}`)\n\n{_escape_doc_cells(markdown_table(cls))}\n"
        )
    return "\n".join(parts)


def metrics_reference() -> str:
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for group in (train_metrics(), label_metrics(), ingest_metrics()):
        for collector in (getattr(group, f.name) for f in dataclasses.fields(group)):
            family = collector.describe()[0]
            labels = ", ".join(f"`{name}`" for name in collector._labelnames)
            suffix = _SAMPLE_SUFFIX[family.type]
            name = f"`{family.name}{suffix}`" if "/" not in suffix else f"`{family.name}` ({suffix})"
            rows.append(f"| {name} | {family.type} | {labels} | {family.documentation} |")
    return "\n".join(rows)


SECTIONS = {"config-reference": config_reference, "metrics": metrics_reference}


def render(text: str) -> str:
    """``text`` with every generated section replaced by what the code says now."""
    for name, build in SECTIONS.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- end:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README.md lacks the markers <!-- generated:{name} --> ... <!-- end:{name} -->")
        body = build()
        text = pattern.sub(lambda m, body=body: m.group(1) + "\n" + body + "\n" + m.group(2), text)
    return text


def stale_sections(text: str) -> list[str]:
    fresh = render(text)
    stale = []
    for name in SECTIONS:
        pattern = re.compile(rf"<!-- generated:{name} -->\n.*?<!-- end:{name} -->", re.S)
        if pattern.search(text).group(0) != pattern.search(fresh).group(0):
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale sections (exit 1)")
    parser.add_argument("--readme", default=str(README))
    args = parser.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text()
    if args.check:
        stale = stale_sections(text)
        if stale:
            sys.exit(f"{path}: generated section(s) {', '.join(stale)} are stale: run `python -m pipelines.docs`")
        return
    path.write_text(render(text))


if __name__ == "__main__":
    main()
