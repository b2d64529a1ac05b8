"""One page model, two renderers: a report is a list of typed blocks written once and rendered
to both HTML (self-contained: inline CSS, no CDN, no JavaScript needed) and Markdown.

The API (stable; the comparison report and the studies build their pages with it)::

    page = Page("Title", css=DEFAULT_CSS, script=None)
    page.add(Heading("Summary"), Paragraph("Regenerate with: `make demo`"))
    page.add(Table(frame, css_class="summary"), Figure("figures/a.png", "alt", "caption"))
    page.add(Code(config_text, language="toml"), BulletList(["one", "two"]))
    page.to_html(), page.to_markdown()          # -> str
    page.write(out_dir)                          # out_dir/index.html and out_dir/report.md

Blocks (frozen dataclasses):

- ``Heading(text, level=2)``: ``##`` / ``<h2>`` (the page title is the only level 1);
- ``Paragraph(text)``: inline ```code``` spans and ``[text](link)`` links are rendered in both
  formats; everything else is plain text (HTML-escaped);
- ``Table(frame, css_class="", na_rep="n/a")``: a ``pandas.DataFrame`` (or a list of row dicts)
  of display values, no index; cells are shown with ``str``, missing ones as ``na_rep``;
- ``Figure(src, alt, caption=None)``: an image by relative path, with an optional caption
  (inline markup as in a paragraph);
- ``Code(text, language="")``: a preformatted block (a command, a config file);
- ``BulletList(items)``: items with inline markup as in a paragraph.

Markdown: the title and blocks joined by blank lines, ending with one newline. HTML: one element
per block and line, the optional ``script`` just before ``</body>``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from flatlab.io import atomic_write_text

__all__ = ["BulletList", "Code", "DEFAULT_CSS", "Figure", "Heading", "Page", "Paragraph",
           "Table", "inline_html", "markdown_table"]

DEFAULT_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1250px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; }
th { background: #f2f2f2; } td:nth-child(-n+3) { text-align: left; }
code, pre { background: #f6f6f6; padding: 0.1em 0.3em; }
pre { padding: 0.6em; overflow-x: auto; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
"""

_CODE_SPAN = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2

    def __post_init__(self) -> None:
        if not 2 <= self.level <= 6:
            raise ValueError(f"heading level must be 2..6 (1 is the page title), got {self.level}")


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame | Sequence[Mapping]
    css_class: str = ""
    na_rep: str = "n/a"

    @property
    def data(self) -> pd.DataFrame:
        return self.frame if isinstance(self.frame, pd.DataFrame) else pd.DataFrame(
            list(self.frame))


@dataclass(frozen=True)
class Figure:
    src: str
    alt: str
    caption: str | None = None


@dataclass(frozen=True)
class Code:
    text: str
    language: str = ""


@dataclass(frozen=True)
class BulletList:
    items: tuple[str, ...]

    def __init__(self, items: Iterable[str]) -> None:
        object.__setattr__(self, "items", tuple(items))


Block = Heading | Paragraph | Table | Figure | Code | BulletList


@dataclass
class Page:
    """A title and a list of blocks; ``css`` goes into ``<style>``, ``script`` (optional) into a
    ``<script>`` element at the end of the body (never needed to view the page)."""

    title: str
    blocks: list[Block] = field(default_factory=list)
    css: str = DEFAULT_CSS
    script: str | None = None

    def add(self, *blocks: Block) -> Page:
        for block in blocks:
            if not isinstance(block, Block):
                raise TypeError(f"not a page block: {type(block).__name__}")
            self.blocks.append(block)
        return self

    def to_markdown(self) -> str:
        return "\n\n".join([f"# {self.title}"] + [_markdown(b) for b in self.blocks]) + "\n"

    def to_html(self) -> str:
        e = html.escape
        parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                 f"<title>{e(self.title)}</title>\n<style>{self.css}</style>\n</head>\n<body>\n"
                 f"<h1>{e(self.title)}</h1>\n"]
        parts += [_html(b) for b in self.blocks]
        if self.script:
            parts.append(f"<script>{self.script}</script>\n")
        parts.append("</body>\n</html>\n")
        return "".join(parts)

    def write(self, out_dir: str | Path, *, html_name: str = "index.html",
              markdown_name: str = "report.md") -> Path:
        """Write both renderings atomically; returns the HTML path."""
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / markdown_name, self.to_markdown())
        atomic_write_text(out_dir / html_name, self.to_html())
        return out_dir / html_name


def inline_html(text: str) -> str:
    """``text`` as HTML: ```code``` spans and ``[text](link)`` links rendered (no links inside
    code spans), everything else escaped."""
    e = html.escape
    parts = _CODE_SPAN.split(text)  # odd positions: the insides of code spans
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{e(part)}</code>")
            continue
        last = 0
        for link in _LINK.finditer(part):
            out.append(e(part[last:link.start()]))
            out.append(f'<a href="{e(link[2])}">{e(link[1])}</a>')
            last = link.end()
        out.append(e(part[last:]))
    return "".join(out)


def markdown_table(frame: pd.DataFrame, na_rep: str = "n/a") -> str:
    """A GitHub-flavoured Markdown table of ``frame``'s cells shown with ``str`` (no index);
    missing values (``None``, NaN) show as ``na_rep``, as in the HTML."""
    def cell(value) -> str:
        if pd.api.types.is_scalar(value) and pd.isna(value):
            return na_rep
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _markdown(block: Block) -> str:
    match block:
        case Heading(text, level):
            return f"{'#' * level} {text}"
        case Paragraph(text):
            return text
        case Table(na_rep=na_rep):
            return markdown_table(block.data, na_rep)
        case Figure(src, alt, caption):
            return f"![{alt}]({src})" + (f"\n\n{caption}" if caption else "")
        case Code(text, language):
            return f"```{language}\n{text.rstrip()}\n```"
        case BulletList(items):
            return "\n".join(f"- {item}" for item in items)
    raise TypeError(f"not a page block: {type(block).__name__}")


def _html(block: Block) -> str:
    e = html.escape
    match block:
        case Heading(text, level):
            return f"<h{level}>{e(text)}</h{level}>\n"
        case Paragraph(text):
            return f"<p>{inline_html(text)}</p>\n"
        case Table(css_class=css_class, na_rep=na_rep):
            return block.data.to_html(index=False, border=0, classes=css_class or None,
                                      na_rep=na_rep) + "\n"
        case Figure(src, alt, caption):
            caption_html = f"<figcaption>{inline_html(caption)}</figcaption>" if caption else ""
            return f"<figure><img src=\"{e(src)}\" alt=\"{e(alt)}\">{caption_html}</figure>\n"
        case Code(text):
            return f"<pre>{e(text)}</pre>\n"
        case BulletList(items):
            return "<ul>\n" + "".join(f"<li>{inline_html(i)}</li>\n" for i in items) + "</ul>\n"
    raise TypeError(f"not a page block: {type(block).__name__}")
