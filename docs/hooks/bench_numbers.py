"""MkDocs hook: the numbers pages quote come from benchmarks/results/*.json, never from memory.

A page writes a placeholder where a measured number goes, for example

    {{ bench:zen5-inference | CvT-13 224 b1 | engine openvino | speedup }}

and the hook replaces it with the value in benchmarks/results/zen5-inference.json. After the
file's name, each key either names a top-level field (`cpu`, `date`, `commit`, `machine`) or
picks, among the file's `results` rows (as `cvt bench --json` writes them), the rows that have
that value in one of their fields (a case, a side); the last key names the field to quote. A
format may follow the last key (`speedup:.2f`); a negative number is written with a minus sign.
A placeholder that names no file, no row or more than one value stops the build.

README.md is not built by MkDocs: its numbers sit between README_BEGIN and README_END, rendered
from README_TEMPLATE. `python docs/hooks/bench_numbers.py` rewrites that block after a new
results file; tests/test_docs.py fails while the README differs from it.
"""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from pathlib import Path

from mkdocs.exceptions import PluginError

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "benchmarks" / "results"
README = REPO_ROOT / "README.md"
README_TEMPLATE = Path(__file__).with_name("readme_numbers.md")
README_BEGIN = "<!-- bench-numbers: generated from docs/hooks/readme_numbers.md by docs/hooks/bench_numbers.py -->"
README_END = "<!-- bench-numbers: end -->"
PLACEHOLDER = re.compile(r"\{\{\s*bench:\s*(?P<body>[^}]*?)\s*\}\}")


def on_page_markdown(markdown, page, config, files):
    return render(markdown, where=page.file.src_uri)


def render(text: str, where: str = "text") -> str:
    """`text` with every placeholder replaced by the value it names."""
    return PLACEHOLDER.sub(lambda m: quote(m["body"], where), text)


def quote(body: str, where: str = "text") -> str:
    """The value one placeholder's body (`file | key | ... | field[:format]`) names, as text."""
    name, *keys = [part.strip() for part in body.split("|")]
    if not keys:
        raise PluginError(f"{where}: {{{{ bench:{body} }}}} names a file but no value in it")
    keys[-1], _, spec = keys[-1].partition(":")
    value = _lookup(load(name), keys, f"{where}: {{{{ bench:{body} }}}}")
    text = format(value, spec) if spec else str(value)
    return "\u2212" + text[1:] if text.startswith("-") else text


@cache
def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RESULTS.glob("*.json")))
        raise PluginError(f"no results file benchmarks/results/{name}.json (there are: {known})")
    return json.loads(path.read_text(encoding="utf-8"))


def _lookup(document: dict, keys: list[str], what: str) -> object:
    current: object = document
    for key in keys:
        if isinstance(current, dict) and key in current:
            current = current[key]
            continue
        rows = current.get("results", []) if isinstance(current, dict) else current
        if not isinstance(rows, list):
            raise PluginError(f"{what}: no {key!r} in a results file; is the number there?")
        rows = [row for row in rows if isinstance(row, dict)]
        with_field = [row for row in rows if key in row]
        if len(with_field) == 1:  # a field only one of the rows picked so far has
            current = with_field[0][key]
            continue
        if with_field:
            raise PluginError(f"{what}: names {len(with_field)} values, not one: add a key before {key!r}")
        rows = [row for row in rows if key in row.values()]
        if not rows:
            raise PluginError(f"{what}: no results row has {key!r}; is the number in a results file?")
        current = rows[0] if len(rows) == 1 else rows
    if not isinstance(current, (str, int, float)):
        raise PluginError(f"{what}: names {len(current)} values, not one: add a key")
    return current


def readme_block() -> str:
    """README.md's generated block, as it should read now."""
    body = render(README_TEMPLATE.read_text(encoding="utf-8"), where=README_TEMPLATE.name).strip()
    return f"{README_BEGIN}\n{body}\n{README_END}"


def readme_current(text: str) -> str:
    """The generated block as README.md holds it (from README_BEGIN to README_END)."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise PluginError(f"README.md lacks the lines {README_BEGIN!r} ... {README_END!r}")
    return text[start:end + len(README_END)]


if __name__ == "__main__":
    text = README.read_text(encoding="utf-8")
    README.write_text(text.replace(readme_current(text), readme_block()), encoding="utf-8")
    sys.exit(0)
