"""The configuration reference, generated from `config/kiosk.yaml` so that it cannot drift.

`config/kiosk.yaml` ships every key with its default and a comment saying what it does (tests/test_config.py
checks it against the config dataclasses). This module turns it into a Markdown reference: one section per
top-level key, one table row per key (keys listed together under one comment share a row), the commented-out
examples as YAML.

It is a MkDocs hook (`hooks:` in mkdocs.yml): the page docs/configuration.md holds the marker below, and every
build, `mkdocs build --strict` included, replaces it with the reference made from the YAML of that moment.
Run alone (`python3 docs/gen_config_ref.py`) it prints the reference. tests/test_docs.py checks that every key
of the config classes is in it and builds the site with `--strict`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "kiosk.yaml"
MARKER = "<!-- config-reference -->"
PAGE = "configuration.md"

# The YAML's comments name README sections; in the docs these are pages.
SECTION_LINKS = {
    "Airport scale": "postgresql.md",
    "Liveness": "liveness.md",
    "Choosing the threshold": "enrollment.md#choosing-the-threshold",
    "Signed webhooks": "integration.md#signed-webhooks",
    "MQTT": "integration.md#mqtt",
}

_KEY = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):(?:\s+(.*))?$")


@dataclass
class Row:
    keys: list[str]
    defaults: list[str]
    text: str


@dataclass
class Section:
    name: str
    intro: str = ""
    rows: list[Row] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)  # key path -> its list entries


def _value(raw: str) -> str:
    """A key's value as written, without a trailing comment (a '#' outside quotes after a space)."""
    quoted = None
    for i, ch in enumerate(raw):
        if ch in "'\"":
            quoted = None if quoted == ch else (quoted or ch)
        elif ch == "#" and quoted is None and i and raw[i - 1] == " ":
            return raw[:i].rstrip()
    return raw.strip()


def parse(text: str) -> tuple[str, list[Section]]:
    """The file's header comment and its sections, from the YAML's text."""
    lines = text.splitlines()
    header: list[str] = []
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        header.append(lines[i].lstrip("#").strip())
        i += 1
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    last_row: Row | None = None  # the row a key without a comment of its own joins
    last_key = ""  # the key a list entry (shipped or commented out) belongs to
    for line in lines[i:]:
        if not line.strip():
            pending, last_row = [], None
            continue
        stripped = line.strip()
        if stripped.startswith("#"):
            body = stripped[1:]
            if body.strip().startswith("- "):  # a commented-out example entry
                sections[-1].examples.setdefault(last_key, []).append(body.strip())
            else:
                pending.append(body.strip())
                last_row = None
            continue
        if stripped.startswith("- "):  # a list entry the file ships with
            sections[-1].examples.setdefault(last_key, []).append(stripped)
            continue
        m = _KEY.match(line)
        if not m:
            raise ValueError(f"{CONFIG.name}: cannot read line {line!r}")
        indent, name, raw = len(m.group(1)), m.group(2), m.group(3) or ""
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value = _value(raw)
        comment = " ".join(pending)
        pending = []
        last_key = ".".join([k for _, k in stack] + [name])
        if not stack:
            section = Section(name, intro=comment)
            sections.append(section)
            if value:  # a top-level key with a value of its own (subscribers: [])
                section.rows.append(Row([name], [value], ""))
            last_row = None
        if not value:
            stack.append((indent, name))
            continue
        if not stack:
            continue
        path = ".".join([k for _, k in stack] + [name])
        if comment or last_row is None:
            last_row = Row([path], [value], comment)
            sections[-1].rows.append(last_row)
        else:
            last_row.keys.append(path)
            last_row.defaults.append(value)
    return " ".join(header), sections


def _prose(text: str) -> str:
    """A comment as Markdown table text: `README "X"` linked to its page, <...> outside code escaped."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if not part.startswith("`"):
            part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
            for title, target in SECTION_LINKS.items():
                part = part.replace(f'README "{title}"', f"[{title}]({target})")
        else:
            part = part.replace("|", "\\|")
        out.append(part)
    return "".join(out)


def reference(text: str | None = None) -> str:
    """The reference, as Markdown, for `text` (default: config/kiosk.yaml as it is now)."""
    header, sections = parse(CONFIG.read_text() if text is None else text)
    out = [f"Generated from `config/kiosk.yaml` at each build of these docs. {_prose(header)}", ""]
    for s in sections:
        out += [f"## {s.name}", ""]
        if s.intro:
            out += [_prose(s.intro), ""]
        if s.rows:
            out += ["| key | default | meaning |", "| --- | --- | --- |"]
            for r in s.rows:
                keys = "<br>".join(f"`{k}`" for k in r.keys)
                defaults = "<br>".join(f"`{d}`".replace("|", "\\|") for d in r.defaults)
                out.append(f"| {keys} | {defaults} | {_prose(r.text)} |")
            out.append("")
        for path, entries in s.examples.items():
            out += [
                f"`{path}`, entries as the file writes them (commented out where it ships none):",
                "",
                "```yaml",
                f"{path.rsplit('.', 1)[-1]}:",
                *(f"  {e}" for e in entries),
                "```",
                "",
            ]
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # the MkDocs hook signature
    """MkDocs hook: the configuration page's marker becomes the reference; its absence fails the build."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise RuntimeError(f"docs/{PAGE} lost its marker {MARKER}: the configuration reference would be missing")
    return markdown.replace(MARKER, reference())


if __name__ == "__main__":
    sys.stdout.write(reference())
