"""Sections of docs/results.md that another recipe owns: kept whole when the main page is rewritten.

A section sits between ``<!-- section: NAME -->`` and ``<!-- end section: NAME -->`` lines, before the
page's ``## Machine`` heading.
"""

from __future__ import annotations

import re

ANCHOR = "## Machine"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- section: {name} -->", f"<!-- end section: {name} -->"


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
