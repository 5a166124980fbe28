"""The build's stages, in build order, each a short module on one contract (``contract``).

The registry below is the seam: ``atlas build`` runs every registered stage in order, and
each also runs alone (``atlas decode``, ``atlas exemplars`` ...). A stage declares the
config it takes and the stages whose rows it reads; its module is imported only when it
runs, so this package imports no torch. Another stage can join through ``register``.
"""

from __future__ import annotations

from atlas.config import ClampConfig, ClusterConfig, DecodeConfig, DescribeConfig, ExemplarConfig, LabelsConfig
from atlas.stages.contract import Stage

STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add ``stage`` after the registered ones; every stage it reads must be registered before it."""
    missing = [name for name in stage.reads if name not in STAGES]
    if missing:
        raise ValueError(f"stage {stage.name} reads unregistered stages: {', '.join(missing)}")
    STAGES[stage.name] = stage
    return stage


# decode: every neuron's directions through the LM head (vocab, neurons, decoded_tokens).
register(Stage("decode", DecodeConfig, reads=(), module="atlas.stages.decode"))
# exemplars: the corpus pass; its normalisers and statistics go into decode's neuron rows.
register(Stage("exemplars", ExemplarConfig, reads=("decode",), module="atlas.stages.exemplars"))
# cluster: geometry of the `out` directions; labels use the exemplars where there are any.
register(Stage("cluster", ClusterConfig, reads=("decode", "exemplars"), module="atlas.stages.cluster"))
# labels: each neuron's concept (word vectors over its decoded tokens), and cluster names from them.
register(Stage("labels", LabelsConfig, reads=("decode", "exemplars", "cluster"), module="atlas.stages.labels"))
# clamp: needs the normalisers; on a CPU budget it picks neurons across clusters.
register(Stage("clamp", ClampConfig, reads=("decode", "exemplars", "cluster"), module="atlas.stages.clamp"))
# describe: an LLM's description of each neuron and its detection score; nothing without an explainer.
register(Stage("describe", DescribeConfig, reads=("decode", "exemplars"), module="atlas.stages.describe"))
