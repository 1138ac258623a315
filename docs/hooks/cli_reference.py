"""MkDocs hook: the command-line reference, rendered from the `cvt` command's own parser.

`render_cli_reference()` walks `cvt.cli.build_parser()` and writes every subcommand with its
usage, description and every option (help, choices, default), so the page cannot drift from
the code; the hook puts it where docs/reference/cli.md says `<!-- cli-reference -->`.
"""

from __future__ import annotations

import argparse

from mkdocs.exceptions import PluginError

from cvt.cli import build_parser

PAGE = "reference/cli.md"
PLACEHOLDER = "<!-- cli-reference -->"
USAGE_WIDTH = 100


def render_cli_reference() -> str:
    """Markdown for the `cvt` command and each of its subcommands, in the parser's order."""
    parser = build_parser()
    sections = [_render_command(parser, "cvt", parser.description)]
    for choice in _subcommand_actions(parser):
        for name, subparser in choice.choices.items():
            summary = next((a.help for a in choice._choices_actions if a.dest == name), None)
            sections.append(_render_command(subparser, f"cvt {name}", subparser.description or summary))
    return "\n\n".join(sections) + "\n"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != PAGE:
        return markdown
    if PLACEHOLDER not in markdown:
        raise PluginError(f"{PAGE} lacks {PLACEHOLDER}, where the generated reference goes")
    return markdown.replace(PLACEHOLDER, render_cli_reference())


def _subcommand_actions(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _render_command(parser: argparse.ArgumentParser, title: str, description: str | None) -> str:
    usage = argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)
    usage.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    lines = [f"## {title}", "", "```text", usage.format_help().strip(), "```", ""]
    if description:
        lines += [_cell(description), ""]
    rows = [_render_action(a) for a in parser._actions if _documented(a)]
    if rows:
        lines += ["| argument | what it does | default |", "|---|---|---|", *rows]
    return "\n".join(lines)


def _documented(action: argparse.Action) -> bool:
    """Every argument but -h and the internal ones hidden from --help."""
    return (action.help is not argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)
            and not isinstance(action, argparse._SubParsersAction))


def _render_action(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(action.option_strings)
        takes_value = action.nargs != 0
        metavar = action.metavar or action.dest.upper()
        name = f"`{names} {metavar}`" if takes_value else f"`{names}`"
    else:
        name = f"`{action.metavar or action.dest}`"
        if action.nargs in ("+", "*"):
            name += " (one or more)" if action.nargs == "+" else " (any number)"
    text = action.help or ""
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        text += f" (one of: {', '.join(f'`{c}`' for c in action.choices)})"
    if action.required and action.option_strings:
        text += " **Required.**"
    return f"| {name} | {_cell(text)} | {_default(action)} |"


def _default(action: argparse.Action) -> str:
    if not action.option_strings or action.default in (None, argparse.SUPPRESS):
        return ""
    if action.nargs == 0:  # a flag
        return "off" if action.default is False else "on" if action.default is True else ""
    return f"`{action.default}`"


def _cell(text: str) -> str:
    """Text for a Markdown table cell or paragraph: one line; pipes and HTML characters escaped
    (help texts say `<class>/`, which Markdown would take for a tag)."""
    text = " ".join(text.split()).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|")
