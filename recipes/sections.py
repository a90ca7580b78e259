"""Sections of docs/results.md that another recipe owns: kept whole when the main page is rewritten.

A section sits between ``<!-- section: NAME -->`` and ``<!-- end section: NAME -->`` lines, before the
page's ``## Machine`` heading.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

ANCHOR = "## Machine"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- section: {name} -->", f"<!-- end section: {name} -->"


def names(page: str) -> list[str]:
    """The names of the sections in ``page``, in order."""
    return re.findall(r"^<!-- section: (.+?) -->$", page, flags=re.M)


def extract(page: str, name: str) -> str | None:
    """The section ``name`` of ``page``, markers included, or None."""
    begin, end = _markers(name)
    m = re.search(re.escape(begin) + r".*?" + re.escape(end), page, flags=re.S)
    return m.group(0) if m else None


def splice(page: str, name: str, body: str) -> str:
    """``page`` with section ``name`` set to ``body`` (replaced where it is, else put before ``## Machine``)."""
    begin, end = _markers(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    old = extract(page, name)
    if old is not None:
        return page.replace(old, block)
    if ANCHOR in page:
        head, _, tail = page.partition(ANCHOR)
        return f"{head}{block}\n\n{ANCHOR}{tail}"
    return page.rstrip("\n") + "\n\n" + block + "\n"


def write(docs: Path, name: str, body: str, report: Path, report_name: str) -> None:
    """Sets section ``name`` of ``docs/results.md`` to ``body`` and copies the run's ``report`` beside it as
    ``report_name``, each atomically (temp file + rename)."""
    page_path = docs / "results.md"
    page = page_path.read_text() if page_path.is_file() else "# Results on the embedded default (digits)\n"
    tmp = docs / f".results.md.{name}.tmp"
    tmp.write_text(splice(page, name, body))
    os.replace(tmp, page_path)
    tmp = docs / f".{report_name}.tmp"
    shutil.copyfile(report, tmp)
    os.replace(tmp, docs / report_name)


def measured(value: float | None, scale: float, spec: str) -> str:
    """A row's params, MACs or throughput as ``format(value / scale, spec)``; 'unavailable' where ``o2m score``
    ran without the model (samples scored away from it record these as null)."""
    return "unavailable" if value is None else format(value / scale, spec)


def images_per_s(row: dict) -> float | None:
    """A score row's throughput, or None where it was not measured (no model)."""
    tp = row.get("throughput")
    return None if not tp else tp.get("images_per_s")


def read_run(work: Path) -> tuple[dict, list[list[str]]]:
    """A finished recipe run's score report and its command log, as [milliseconds, command] pairs."""
    report = json.loads((work / "scores" / "report.json").read_text())
    commands = [line.split("\t", 1) for line in (work / "commands.tsv").read_text().splitlines() if line]
    return report, commands


def commands_block(commands: list[list[str]]) -> list[str]:
    """The run's commands with their wall times, as the page's last subsection (two lanes, then the score)."""
    return ["### Commands, in order, with wall time (lane A, then lane B, which ran at the same time, then the score)",
            "", "```", *[f"{int(ms) / 1000:8.1f} s  {cmd}" for ms, cmd in commands], "```"]
