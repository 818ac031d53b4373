"""HTML pages: jinja2 templates (kcollapse/templates/) rendered with autoescaping, and `esc` for hostile text.

Every value a template prints is escaped unless it is already markup (a figure's <img>, a rendered section).
Model-written text is hostile input, so the `text` filter goes further than escaping: control characters, bidi
overrides and lone surrogates become visible <U+XXXX>, and very long texts are cut with a note. Pages are
self-contained: the layout (page.html) has no script and fetches nothing; figures are base64 data: URIs.
"""

from __future__ import annotations

import base64
import html
import unicodedata

import jinja2
from markupsafe import Markup

BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def esc(text, limit: int = 1500) -> str:
    """HTML-safe rendering of untrusted text: escaped, invisible characters shown as <U+XXXX>, cut at `limit`."""
    if text is None:
        return '<span class="note">(none)</span>'
    text = str(text)
    note = ""
    if len(text) > limit:
        note = f' <span class="trunc">[… truncated: {len(text):,} characters in all]</span>'
        text = text[:limit]
    out, run = [], []
    for ch in text:
        o = ord(ch)
        bad = (0xD800 <= o <= 0xDFFF or ch in BIDI or o in (0xFEFF, 0xFFFD) or
               (unicodedata.category(ch) == "Cc" and ch not in "\n\t"))
        if bad:
            out.append(html.escape("".join(run)))
            run = []
            out.append(f'<span class="ctl">&lt;U+{o:04X}&gt;</span>')
        else:
            run.append(ch)
    out.append(html.escape("".join(run)))
    return "".join(out) + note


def img(data: bytes, alt: str) -> Markup:
    """An <img> with the PNG embedded as a data: URI."""
    return Markup('<img alt="{}" src="data:image/png;base64,{}">').format(alt, base64.b64encode(data).decode())


def num(v, digits: int = 2) -> str:
    return "–" if v is None or v != v else f"{v:.{digits}f}"


def interval(v, digits: int = 2) -> str:
    """[lo, hi]; an open upper end (a one-sided bound) as ∞."""
    if not v:
        return "–"
    return f"[{num(v[0], digits)}, {'∞' if v[1] is None else num(v[1], digits)}]"


def undefined_in(result: dict) -> str:
    """' (undefined in 35% of resamples)' beside a decline-rate ratio's interval that fewer than all resamples drew."""
    share = result.get("decline_ratio_undefined_share")
    return f" (undefined in {share:.0%} of resamples)" if result.get("decline_ratio_ci") and share else ""


ENV = jinja2.Environment(loader=jinja2.PackageLoader("kcollapse", "templates"), autoescape=True,
                         undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
ENV.filters.update(text=lambda v, limit=1500: Markup(esc(v, limit)), num=num, interval=interval,
                   undefined_in=undefined_in)


def render(template: str, **context) -> Markup:
    """A template of kcollapse/templates/ rendered (autoescaped) as markup to put in a page."""
    return Markup(ENV.get_template(template).render(**context))


def page(title: str, body) -> str:
    """The whole self-contained page; `body` must be markup (rendered templates, or text escaped with esc)."""
    return ENV.get_template("page.html").render(title=title, body=Markup(body))
