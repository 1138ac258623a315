"""MkDocs hook: the table of `CvtConfig`'s fields, rendered from the dataclass itself.

Names, defaults and descriptions come from the code (each field's docstring in
src/cvt/config.py), so the page cannot drift; the hook puts the table where
docs/reference/config.md says `<!-- config-fields -->`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json

from mkdocs.exceptions import PluginError

from cvt import config as config_module
from cvt.config import CvtConfig

PAGE = "reference/config.md"
PLACEHOLDER = "<!-- config-fields -->"


def render_config_fields() -> str:
    """A Markdown table: every field `CvtConfig` adds to transformers' `PreTrainedConfig`, its
    default, and its docstring (the inherited ones are transformers' to document)."""
    docs = _field_docstrings()
    per_stage = set(CvtConfig.stage_fields())
    own = set(CvtConfig.architecture_fields())
    rows = ["| field | default | per stage | what it sets |", "|---|---|---|---|"]
    for field in (f for f in dataclasses.fields(CvtConfig) if f.name in own):
        if field.name not in docs:
            raise PluginError(f"CvtConfig.{field.name} has no docstring to document it with")
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        rows.append(f"| `{field.name}` | `{_json(default)}` | {'yes' if field.name in per_stage else ''} "
                    f"| {' '.join(docs[field.name].split())} |")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != PAGE:
        return markdown
    if PLACEHOLDER not in markdown:
        raise PluginError(f"{PAGE} lacks {PLACEHOLDER}, where the generated table goes")
    return markdown.replace(PLACEHOLDER, render_config_fields())


def _json(value: object) -> str:
    """A default as it reads in config.json (tuples as lists, None as null)."""
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _field_docstrings() -> dict[str, str]:
    """Each annotated field of the CvtConfig class body -> the string literal right after it."""
    tree = ast.parse(inspect.getsource(config_module))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CvtConfig").body
    docs = {}
    for field, after in zip(body, body[1:]):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[field.target.id] = after.value.value
    return docs
