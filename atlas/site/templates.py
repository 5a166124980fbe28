"""The jinja environment that every page of the site is rendered with, and its filters.

Templates live in ``site_templates/`` (see ``atlas.resources``): one base layout and a
partial per page section. Autoescaping is on, and a name a template uses but is not given
is an error, not an empty string.
"""

from __future__ import annotations

import jinja2

from atlas.resources import TEMPLATES
from atlas.site.text import fmt_act, fmt_logit, fmt_share, fmt_prob, fmt_stat, md_safe, show_label, show_token


def environment() -> jinja2.Environment:
    """A fresh environment over ``site_templates/`` with the site's filters."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(show_token=show_token, show_label=show_label, md_safe=md_safe, fmt_logit=fmt_logit,
                       fmt_prob=fmt_prob, fmt_stat=fmt_stat, fmt_act=fmt_act, fmt_share=fmt_share)
    return env
