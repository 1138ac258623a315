"""MkDocs hook: pages that live outside docs/ become pages of the site, not links out of it.

CONTRIBUTING.md and benchmarks/README.md stay where GitHub and contributors look for them. Their
relative links are written for their place in the repository; so are links from docs/ pages to
them (`../CONTRIBUTING.md`). This hook adds them to the site under the names in ROOT_PAGES and
rewrites every such link to the page's place in the site, so that the same Markdown works on
GitHub and in the site. A link from an outside page to a file that is not in the site is an
error: the site would have nowhere to send it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

# repository path -> site path (relative to docs/)
ROOT_PAGES = {"CONTRIBUTING.md": "contributing.md", "benchmarks/README.md": "benchmarks.md"}
SITE_TO_ROOT = {uri: source for source, uri in ROOT_PAGES.items()}

_LINK = re.compile(r"(\]\()([^)\s#]*)(#[^)\s]*)?(\))")
_FENCE = re.compile(r"^\s*(```|~~~)")


def on_files(files, config):
    root = Path(config.config_file_path).parent
    for source, uri in ROOT_PAGES.items():
        files.append(File.generated(config, uri, abs_src_path=str(root / source)))
    return files


def on_page_markdown(markdown, page, config, files):
    here = SITE_TO_ROOT.get(page.file.src_uri, f"docs/{page.file.src_uri}")
    lines, in_fence = [], False
    for line in markdown.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        if not in_fence:
            line = _LINK.sub(lambda m: _rewrite(m, here, page.file.src_uri), line)
        lines.append(line)
    return "\n".join(lines)


def _rewrite(match: re.Match, here: str, page_uri: str) -> str:
    """One link `](target#anchor)` of the page at repository path `here`, seen from the site."""
    target, anchor = match.group(2), match.group(3) or ""
    if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
        return match.group(0)  # an anchor on the same page, a URL, or an absolute path
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(here), target))
    if resolved in ROOT_PAGES:
        site_target = ROOT_PAGES[resolved]
    elif resolved.startswith("docs/"):
        site_target = resolved.removeprefix("docs/")
    elif here in ROOT_PAGES:
        raise PluginError(f"{here} links to {target}, which is not part of the site: link to a page "
                          "under docs/ or in ROOT_PAGES (docs/hooks/root_pages.py), or name the file as code")
    else:
        return match.group(0)  # a docs/ page's own link: MkDocs checks it
    relative = posixpath.relpath(site_target, posixpath.dirname(page_uri) or ".")
    return f"{match.group(1)}{relative}{anchor}{match.group(4)}"
