"""Neuron addresses as people write them, checked against the atlas they name.

Accepted forms: ``13/777``, ``L13/N777`` (as the site labels neurons), ``13:777`` and
``neurons/13/777`` (a piece of a page URL). Commands that take a neuron (``atlas info
--neuron``, and any command that steers or searches by neuron) resolve it here, so an
address out of range gets the same one-line answer everywhere.
"""

from __future__ import annotations

import re

from atlas.errors import AtlasError

_ADDRESS = re.compile(r"^\s*(?:neurons/)?L?(-?\d+)\s*[/:]\s*N?(-?\d+)/?\s*$", re.IGNORECASE)


def parse_neuron(text: str) -> tuple[int, int]:
    """``(layer, neuron)`` from an address; AtlasError naming the text if it is not one."""
    m = _ADDRESS.match(str(text))
    if not m:
        raise AtlasError(f"cannot read neuron address {str(text)[:80]!r}: "
                         "write LAYER/NEURON, e.g. 13/777 or L13/N777")
    return int(m.group(1)), int(m.group(2))


def check_neuron(layer: int, neuron: int, layer_sizes: list[int]) -> tuple[int, int]:
    """``(layer, neuron)`` if the atlas has it; otherwise AtlasError saying what the atlas does have."""
    if not 0 <= layer < len(layer_sizes):
        raise AtlasError(f"neuron L{layer}/N{neuron} is out of range: the atlas has layers 0 to "
                         f"{len(layer_sizes) - 1}")
    if not 0 <= neuron < layer_sizes[layer]:
        raise AtlasError(f"neuron L{layer}/N{neuron} is out of range: layer {layer} has neurons 0 to "
                         f"{layer_sizes[layer] - 1}")
    return layer, neuron


def layer_sizes(con) -> list[int]:
    """Neurons per layer of the store behind ``con`` (a DuckDB connection)."""
    sizes = dict(con.execute("SELECT layer, count(*) FROM neurons GROUP BY layer").fetchall())
    return [sizes.get(layer, 0) for layer in range(max(sizes, default=-1) + 1)]


def resolve_neuron(con, text: str) -> tuple[int, int]:
    """Parse ``text`` and check it against the store behind ``con``."""
    if isinstance(text, (tuple, list)):
        layer, neuron = text
    else:
        layer, neuron = parse_neuron(text)
    sizes = layer_sizes(con)
    if not sizes:
        raise AtlasError("the atlas has no neurons yet; run `atlas decode` first")
    return check_neuron(layer, neuron, sizes)
