"""Load a causal LM and its tokenizer from the embedded default, a local directory, a .gguf file or the hub."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from atlas.config import check_device
from atlas.model.arch import Adapter, adapter_for
from atlas.errors import AtlasError
from atlas.model.files import DEFAULT_MODEL, hash_weights, resolve

@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: Adapter
    model_id: str                 # a name people recognise, e.g. the hub id
    source: str                   # what the user passed, resolved
    weights_files: list[Path] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def weights_hash(self) -> str:
        return hash_weights(self.weights_files)

    def limits(self) -> dict:
        """What settings are checked against once the model loads: its vocabulary, and the
        number of positions for a model with learned position embeddings (GPT-2's ``wpe``),
        which cannot read past them; None for rotary models, which can."""
        positions = None
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_EMBEDDINGS:
                positions = module.num_embeddings
        return {"vocab": int(self.adapter.W_U(self.model).shape[0]), "positions": positions}

    def describe(self) -> dict:
        """The provenance recorded in ``atlas_meta['model']``."""
        m, a = self.model, self.adapter
        config = {k: v for k, v in m.config.to_dict().items() if _jsonable(v)}
        return {
            "id": self.model_id, "source": self.source, "adapter": a.name,
            "architecture": m.config.model_type, "n_layers": a.n_layers(m), "d_mlp": a.d_mlp(m),
            "d_model": a.W_U(m).shape[1], "vocab_size": a.W_U(m).shape[0],
            "dtype": str(next(m.parameters()).dtype).removeprefix("torch."),
            "sides": list(a.sides), "config": config,
        }


def _jsonable(v) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))


POSITION_EMBEDDINGS = ("wpe", "embed_positions", "position_embeddings")


def pick_device(device: str = "auto") -> torch.device:
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AtlasError(f"--device {device} asked for, but CUDA is not available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise AtlasError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)") from None


CACHE_ENV = "ATLAS_MODEL_CACHE"      # a folder for converted GGUF models; "0" turns the cache off
SOURCE_FILE = "atlas-gguf-source.json"


def gguf_cache_dir(gguf: Path, torch_dtype: torch.dtype) -> Path | None:
    """Where a GGUF model converted to safetensors is kept, or None when the cache is off.

    Reading a GGUF file costs transformers about 28 s on 2 cores for the 135M default (its
    metadata is parsed three times: config, tokenizer, weights); the converted copy loads in
    under a second. The key is the file (path, size, modification time), the transformers
    version and the dtype, so a changed file or library makes a new copy. The weights hash
    is still taken from the GGUF file.
    """
    root = os.environ.get(CACHE_ENV)
    if root == "0":
        return None
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atlas" / "models"
    import transformers

    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|{torch_dtype}"
    return Path(root) / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _complete(folder: Path | None) -> bool:
    return folder is not None and all((folder / f).is_file() for f in ("config.json", "model.safetensors",
                                                                        "tokenizer.json", SOURCE_FILE))


def _save_converted(model, tokenizer, folder: Path) -> None:
    """Write the loaded GGUF model as config + safetensors + tokenizer, atomically (a folder
    renamed into place: two processes converting at once leave one whole copy)."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        config = model.config.to_dict()
        # GGUF's quantization record and the source path go beside, not in, the config (the saved
        # weights are plain tensors); a load from the copy puts them back, so the provenance
        # that atlas records (``LoadedModel.describe``) is the same either way.
        source = {"_name_or_path": config.pop("_name_or_path", None),
                  "quantization_config": config.pop("quantization_config", None)}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, default=str))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)            # tied: one tensor, as transformers saves it
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config))
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(folder)
        except OSError:                                  # another process got there first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_converted(folder: Path, torch_dtype: torch.dtype, spec: str | None) -> tuple:
    """(model, tokenizer) from a copy ``_save_converted`` wrote, with the GGUF's config entries put back."""
    model, tokenizer = _read(str(folder), {}, torch_dtype, spec)
    for key, value in json.loads((folder / SOURCE_FILE).read_text()).items():
        if value is not None:
            setattr(model.config, key, value)
    return model, tokenizer


def load_model(spec: str | None = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM for atlas. Bad input raises ``AtlasError`` with a one-line reason.

    A GGUF model is converted once and kept (``gguf_cache_dir``); later loads read the copy,
    and a copy that does not load is removed and made again from the file.
    """
    location, kwargs, model_id, files = resolve(spec)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    gguf = Path(location) / kwargs["gguf_file"] if "gguf_file" in kwargs else None
    cache = gguf_cache_dir(gguf, torch_dtype) if gguf is not None else None
    loaded = None
    if _complete(cache):
        try:
            loaded = _read_converted(cache, torch_dtype, spec)
        except (AtlasError, OSError, ValueError) as e:
            logging.getLogger(__name__).debug("the converted copy %s did not load (%s); converting again", cache, e)
            shutil.rmtree(cache, ignore_errors=True)
    if loaded is None:
        loaded = _read(location, kwargs, torch_dtype, spec)
        if cache is not None:
            try:
                _save_converted(loaded[0], loaded[1], cache)
            except Exception as e:  # a full or read-only disk costs the next load time, not this one
                logging.getLogger(__name__).debug("could not keep a converted copy in %s: %s", cache, e)
    model, tokenizer = loaded
    model.to(dev).eval()
    model.requires_grad_(False)
    logging.getLogger(__name__).debug("loaded %s on %s as %s", model_id, dev, torch_dtype)
    return LoadedModel(model, tokenizer, adapter_for(model), model_id,
                       os.fspath(spec or location), files)


def _read(location: str, kwargs: dict, torch_dtype: torch.dtype, spec: str | None) -> tuple:
    """(model, tokenizer) from a folder or a GGUF file, any failure as a one-line ``AtlasError``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    loading = "the model"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(location, **kwargs)
            # Reject unknown families before paying for the weights.
            from atlas.model.arch import ADAPTERS
            if config.model_type not in ADAPTERS:
                raise AtlasError(f"unsupported architecture {config.model_type!r} "
                                 f"(supported: {', '.join(sorted(ADAPTERS))})")
            loading = "its tokenizer"
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            loading = "the model"
            # The config read above, not a second read of it (each read of a GGUF file parses all of its
            # metadata, the whole vocabulary included: seconds on 2 cores).
            model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=torch_dtype, **kwargs)
    except AtlasError:
        raise
    except Exception as e:  # a truncated or foreign file fails in many ways; all mean "bad model input"
        # The whole message on one line: transformers' tokenizer errors list their causes on
        # the lines after "... from one of:".
        first = " ".join(str(e).split())[:600] or type(e).__name__
        if loading == "its tokenizer":
            raise AtlasError(f"could not load the tokenizer of {spec or location}: {first}") from None
        if "gguf_file" in kwargs:
            from atlas.model.gguf_check import gguf_problem
            first = gguf_problem(Path(location) / kwargs["gguf_file"]) or first
        raise AtlasError(f"could not load model from {spec or location}: {first}") from None
    return model, tokenizer


def vocab_strings(tokenizer, vocab_size: int) -> tuple[list[str], list[str]]:
    """Readable text and raw piece for every row of the unembedding.

    Rows past the tokenizer's length (embedding padding) get a placeholder, not an error.
    """
    n = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    pieces = [p if isinstance(p, str) else "" for p in tokenizer.convert_ids_to_tokens(list(range(n)))]
    pad = [f"<unused {i}>" for i in range(n, vocab_size)]
    return texts + pad, pieces + pad
