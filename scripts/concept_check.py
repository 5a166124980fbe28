#!/usr/bin/env python3
"""Print the README's concept table: clamp each concept's strongest neuron on held-out prompts.

    python scripts/concept_check.py out/smollm2            # needs decode + exemplars in the atlas
    python scripts/concept_check.py out/smollm2 --multiple 4
"""

from __future__ import annotations

import argparse
import sys

from atlas.stages.clamp import ClampConfig
from atlas.concepts import HELD_OUT, check, markdown
from atlas.errors import AtlasError
from atlas.model.load import load_model
from atlas.pipeline import store_path
from atlas.store import Store


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("atlas", help="atlas output directory (or its atlas.duckdb)")
    ap.add_argument("--multiple", type=float, default=ClampConfig.clamp_multiple,
                    help="clamp to this multiple of the normaliser (default: the clamp stage's)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    try:
        with Store(store_path(args.atlas), read_only=True) as store:
            lm = load_model((store.meta("model") or {}).get("source"), args.device)
            results = check(store.con, lm, args.multiple)
    except AtlasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(results, args.multiple, len(HELD_OUT)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
