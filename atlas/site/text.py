"""How values look on the site: text made visible and escaped, numbers formatted, JSON written.

Token and corpus text needs more than escaping: a bidi override (U+202E) would reverse the
rest of a table row, and a leading space is the difference between two tokens. These run
hundreds of times per page on half a million pages, so token conversions are cached.

This is the site's one leaf for text: every module of ``atlas.site`` imports it, and it
imports nothing of the site, so no page section reaches back into the orchestrator.
"""

from __future__ import annotations

import html
import re
import unicodedata
from functools import lru_cache
from typing import Any

import orjson
from markupsafe import Markup, escape

# Control, format, surrogate, private-use, unassigned and separator characters: shown as
# their code point, since raw they are invisible or change the direction of what follows.
INVISIBLE = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"))
EMPTY = "\u2205"
_TOKEN_SYMBOLS = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}
_STRIP_SYMBOLS = {" ": " ", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}
_LABEL_SYMBOLS = {" ": " "}


def reveal(text: str, symbols: dict[str, str]) -> str:
    """``text`` with each character of ``symbols`` replaced by its symbol, and every other
    character of an ``INVISIBLE`` category by its code point, e.g. ``⟨U+202E⟩``."""
    out = []
    for ch in text:
        symbol = symbols.get(ch)
        if symbol is not None:
            out.append(symbol)
        elif unicodedata.category(ch) in INVISIBLE:
            out.append(f"\u27e8U+{ord(ch):04X}\u27e9")
        else:
            out.append(ch)
    return "".join(out)


@lru_cache(maxsize=1 << 17)
def show_token(token: str | None) -> str:
    """Token text with whitespace and invisible characters made visible (not yet escaped)."""
    if token is None:
        return EMPTY
    return reveal(token, _TOKEN_SYMBOLS) or EMPTY


@lru_cache(maxsize=1 << 17)
def token_cell(token: str | None) -> str:
    """``show_token``, escaped for HTML."""
    return str(escape(show_token(token)))


def strip_text(token: str | None) -> str:
    """Escaped token text for an exemplar strip: spaces stay spaces (the strip reads as
    text); line breaks and invisible or direction-changing characters become symbols."""
    return html.escape(reveal(token or "", _STRIP_SYMBOLS)) or EMPTY


@lru_cache(maxsize=1 << 16)      # neighbour labels repeat across the pages of a block
def visible(text: str | None) -> str:
    """Label text on one line, with control and direction-changing characters shown as code points."""
    if not text:
        return ""
    # After the split every separator left is a plain space, which stays as it is.
    return reveal(" ".join(text.split()), _LABEL_SYMBOLS)


def show_label(label: str | None) -> str:
    """A neuron's or cluster's label as a page shows it: labels are made of token text, so
    the same control and bidi characters must not act (see ``visible``)."""
    return visible(label)


_MARKDOWN_SYNTAX = set("\\`*_{}[]()<>#!|~&\"'")


def md_safe(text: str | None) -> Markup:
    """Text for a markdown page that neither HTML nor markdown reads as markup (links, code spans)."""
    return Markup("".join(f"&#{ord(ch)};" if ch in _MARKDOWN_SYNTAX else ch for ch in visible(text)))


# -- numbers -----------------------------------------------------------------------------
def fmt_logit(x: float | None) -> str:
    return "\u2013" if x is None else f"{x:.2f}"


def fmt_prob(x: float | None) -> str:
    if x is None:
        return "\u2013"
    return f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}".replace("e-0", "e-")


def fmt_stat(x: float | None) -> str:
    return "\u2013" if x is None else f"{x:.3g}"


def fmt_act(x: float | None) -> str:
    """An activation as strips, their legend and their hover values show it: always 3 significant
    digits, trailing zeros kept (``1.00`` beside ``0.969``, never ``1``)."""
    if x is None or x != x:
        return "\u2013"
    return f"{x:#.3g}".replace(".e", "e").rstrip(".")


def fmt_share(x: float | None) -> str:
    """A share as a percentage with 2 significant digits (``3.1%``, ``0.012%``, ``45%``, ``100%``)."""
    if x is None or x != x:
        return "\u2013"
    pct = 100 * x
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"


# -- JSON --------------------------------------------------------------------------------
# What the site's JSON text never holds raw: markup characters (all inside strings, where
# ``\u003c`` means the same), JavaScript's line terminators U+2028 and U+2029, and the
# controls that a viewer showing the file as text would obey: DEL, C1, and the bidi marks,
# embeddings, overrides and isolates. JSON itself forbids raw C0 controls in strings.
_UNSAFE = re.compile("[<>&\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def html_safe_json(text: str) -> str:
    """JSON ``text`` with every ``_UNSAFE`` character written as a ``\\u`` escape, so that it
    can sit inside HTML (a ``<script>`` element) and shows no hidden controls.

    All of them can only be inside strings, where the escape means the same character.
    Most texts hold none, and for ASCII text four scans find that out fast.
    """
    if text.isascii():
        if "<" not in text and ">" not in text and "&" not in text and "\x7f" not in text:
            return text
    elif _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


_JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _json_default(obj: Any) -> Any:
    # What the standard writer did with ``default=str``: float subclasses (numpy's float64)
    # are numbers, and anything else it cannot write (dates, dataclasses, numpy's other
    # scalars) is its ``str``.
    return float(obj) if isinstance(obj, float) else str(obj)


def to_json(obj: Any) -> str:
    """The site's JSON writer: sorted keys, compact, ``html_safe_json``, one trailing newline.

    Keys must be strings. NaN and infinities, which JSON cannot carry, are written as null.
    """
    return html_safe_json(orjson.dumps(obj, default=_json_default, option=_JSON_OPTIONS).decode("utf-8")) + "\n"


def script_json(obj: Any) -> Markup:
    """``to_json`` of ``obj`` as markup to inline in a ``<script>`` element as it is."""
    return Markup(to_json(obj))
