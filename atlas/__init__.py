"""atlas: a static, searchable, citable website with one page per MLP neuron.

The command line is a thin layer over this API, which works as well in a notebook::

    from atlas import Build, DecodeConfig, build
    build("out/smollm2")                              # every stage, then the site
    b = Build("out/smollm2"); b.decode(DecodeConfig(top_k=50)); b.render()

Names load on first use, so ``import atlas`` costs nothing and the site never pulls in torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "build": "atlas.pipeline", "Build": "atlas.pipeline", "render_site": "atlas.pipeline",
    "DecodeConfig": "atlas.config", "ExemplarConfig": "atlas.config", "ClusterConfig": "atlas.config",
    "ClampConfig": "atlas.config", "RenderConfig": "atlas.config",
    "STAGES": "atlas.stages", "register": "atlas.stages", "Stage": "atlas.stages.contract",
    "Context": "atlas.stages.contract", "stale_stages": "atlas.stages.contract",
    "Store": "atlas.store", "load_model": "atlas.model.load", "render": "atlas.site.render",
    "search": "atlas.site.search_query", "steer": "atlas.steer", "AtlasError": "atlas.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'atlas' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
