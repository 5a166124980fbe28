"""How values look on a page: token text made visible and escaped, numbers formatted.

Token text needs more than escaping: a bidi override (U+202E) would reverse the rest of a
table row, and a leading space is the difference between two tokens. These run hundreds
of times per page on half a million pages, so token conversions are cached.
"""

from __future__ import annotations

import html
import unicodedata
from functools import lru_cache

from markupsafe import Markup, escape

_INVISIBLE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")
_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}
_STRIP_VISIBLE = {"\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


@lru_cache(maxsize=1 << 17)
def show_token(token: str | None) -> str:
    """Token text with whitespace and invisible characters made visible (not yet escaped)."""
    if token is None:
        return "\u2205"
    out = []
    for ch in token:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch) in _INVISIBLE:
            out.append(f"\u27e8U+{ord(ch):04X}\u27e9")
        else:
            out.append(ch)
    return "".join(out) or "\u2205"


@lru_cache(maxsize=1 << 17)
def token_cell(token: str | None) -> str:
    """``show_token``, escaped for HTML."""
    return str(escape(show_token(token)))


def strip_text(token: str | None) -> str:
    """Escaped token text for an exemplar strip: spaces stay spaces (the strip reads as
    text); line breaks and invisible or direction-changing characters become symbols."""
    out = []
    for ch in token or "":
        if ch in _STRIP_VISIBLE:
            out.append(_STRIP_VISIBLE[ch])
        elif ch != " " and unicodedata.category(ch) in _INVISIBLE:
            out.append(f"\u27e8U+{ord(ch):04X}\u27e9")
        else:
            out.append(ch)
    return html.escape("".join(out)) or "\u2205"


def fmt_logit(x: float | None) -> str:
    return "\u2013" if x is None else f"{x:.2f}"


def fmt_prob(x: float | None) -> str:
    if x is None:
        return "\u2013"
    return f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}".replace("e-0", "e-")


def fmt_stat(x: float | None) -> str:
    return "\u2013" if x is None else f"{x:.3g}"


def delta_list(items: list[tuple]) -> Markup:
    """(token, Δ log p) pairs as ``<b>token</b> +1.23`` joined by dots (a clamp section's rises and falls)."""
    return Markup(" · ".join(f"<b>{token_cell(t)}</b> {d:+.2f}" for t, d in items))
