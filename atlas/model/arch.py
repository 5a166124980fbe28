"""Architecture adapters: where each standard part of an MLP lives in a Hugging Face model.

An adapter maps the standard names used everywhere in atlas (``mlp.in``, ``mlp.gate``,
``mlp.out``, ``norm.pre_mlp``, ``norm.final``, ``unembed``) to module paths of one model
family. Adding a family is one ``register(Adapter(...), "model_type")`` call; nothing else
in atlas branches on the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from atlas.errors import AtlasError


@dataclass(frozen=True)
class Adapter:
    name: str
    layers: str                 # the ModuleList of decoder blocks, from the model root
    mlp_in: str                 # from a block: up projection (gated) or W_in (plain)
    mlp_gate: str | None        # from a block: gate projection; None for plain MLPs
    mlp_out: str                # from a block: down projection / W_out; its input is the activation
    norm_pre_mlp: str           # from a block: the norm whose output the MLP reads
    norm_final: str             # from the model root
    unembed: str                # from the model root; "a|b" tries a, then b (renamed across versions)
    conv1d: bool = False        # GPT-2 stores Conv1D weights as [d_in, d_out]
    norm_offset: float = 0.0    # Gemma norms scale by (1 + w): the effective gain is w + offset

    @property
    def sides(self) -> tuple[str, ...]:
        return ("in", "gate", "out") if self.mlp_gate else ("in", "out")

    # -- module access -------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def module(self, model: nn.Module, layer: int, part: str) -> nn.Module:
        path = {"in": self.mlp_in, "gate": self.mlp_gate, "out": self.mlp_out,
                "norm": self.norm_pre_mlp}[part]
        return self.blocks(model)[layer].get_submodule(path)

    def out_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose input is the neuron activation (the hook point)."""
        return self.module(model, layer, "out")

    def _weight(self, module: nn.Module) -> torch.Tensor:
        # nn.Linear keeps [d_out, d_in]; GPT-2's Conv1D keeps [d_in, d_out].
        w = module.weight.detach()
        return w.T if self.conv1d else w

    # -- the tensors decoding needs ------------------------------------------------
    def W_in(self, model: nn.Module, layer: int) -> torch.Tensor:
        return self._weight(self.module(model, layer, "in"))          # [d_mlp, d_model]

    def W_gate(self, model: nn.Module, layer: int) -> torch.Tensor:
        return self._weight(self.module(model, layer, "gate"))        # [d_mlp, d_model]

    def W_out(self, model: nn.Module, layer: int) -> torch.Tensor:
        return self._weight(self.module(model, layer, "out"))         # [d_model, d_mlp]

    def pre_mlp_gain(self, model: nn.Module, layer: int) -> torch.Tensor:
        return self.module(model, layer, "norm").weight.detach() + self.norm_offset  # [d_model]

    def final_gain(self, model: nn.Module) -> torch.Tensor:
        return model.get_submodule(self.norm_final).weight.detach() + self.norm_offset  # [d_model]

    def W_U(self, model: nn.Module) -> torch.Tensor:
        for path in self.unembed.split("|"):
            try:
                return model.get_submodule(path).weight.detach()      # [vocab, d_model]
            except AttributeError:
                continue
        raise AttributeError(f"no unembedding at {self.unembed}")

    def d_mlp(self, model: nn.Module) -> int:
        return self.W_out(model, 0).shape[1]

    def direction(self, model: nn.Module, layer: int, side: str) -> torch.Tensor:
        """Residual-stream directions of every neuron of a layer for one side. [d_mlp, d_model]

        ``in`` and ``gate`` rows read the normalised residual, so they are scaled by the
        pre-MLP norm's gain; ``out`` columns are written to the residual as they are.
        """
        if side == "out":
            return self.W_out(model, layer).T
        if side == "gate" and not self.mlp_gate:
            raise AtlasError(f"architecture {self.name} has no gate side")
        W = self.W_in(model, layer) if side == "in" else self.W_gate(model, layer)
        return W * self.pre_mlp_gain(model, layer)

    def validate(self, model: nn.Module) -> None:
        """Fail with one line if the model lacks a part this adapter expects."""
        try:
            n = self.n_layers(model)
            if n == 0:
                raise AtlasError("the model has no decoder layers")
            for part in ("in", "out", "norm") + (("gate",) if self.mlp_gate else ()):
                self.module(model, 0, part).weight
            model.get_submodule(self.norm_final).weight
            self.W_U(model)
        except (AttributeError, IndexError) as e:
            raise AtlasError(f"model has no MLP that the {self.name} adapter knows ({e})") from None


ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter, *model_types: str) -> Adapter:
    """Make ``adapter`` the one used for models whose ``config.model_type`` is in ``model_types``."""
    for t in model_types:
        ADAPTERS[t] = adapter
    return adapter


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        known = ", ".join(sorted(ADAPTERS))
        raise AtlasError(f"unsupported architecture {model_type!r} (supported: {known})")
    adapter.validate(model)
    return adapter


# Gated MLPs whose modules follow the Llama naming.
LLAMA = register(
    Adapter("llama", layers="model.layers", mlp_in="mlp.up_proj", mlp_gate="mlp.gate_proj",
            mlp_out="mlp.down_proj", norm_pre_mlp="post_attention_layernorm",
            norm_final="model.norm", unembed="lm_head"),
    "llama", "mistral", "qwen2", "qwen3",
)
# Gemma scales by (1 + w) and, from Gemma 2 on, has a separate pre-feedforward norm.
register(Adapter("gemma", layers="model.layers", mlp_in="mlp.up_proj", mlp_gate="mlp.gate_proj",
                 mlp_out="mlp.down_proj", norm_pre_mlp="post_attention_layernorm",
                 norm_final="model.norm", unembed="lm_head", norm_offset=1.0),
         "gemma")
register(Adapter("gemma2", layers="model.layers", mlp_in="mlp.up_proj", mlp_gate="mlp.gate_proj",
                 mlp_out="mlp.down_proj", norm_pre_mlp="pre_feedforward_layernorm",
                 norm_final="model.norm", unembed="lm_head", norm_offset=1.0),
         "gemma2", "gemma3_text")
register(Adapter("gpt2", layers="transformer.h", mlp_in="mlp.c_fc", mlp_gate=None,
                 mlp_out="mlp.c_proj", norm_pre_mlp="ln_2", norm_final="transformer.ln_f",
                 unembed="lm_head", conv1d=True),
         "gpt2")
register(Adapter("gpt_neox", layers="gpt_neox.layers", mlp_in="mlp.dense_h_to_4h", mlp_gate=None,
                 mlp_out="mlp.dense_4h_to_h", norm_pre_mlp="post_attention_layernorm",
                 norm_final="gpt_neox.final_layer_norm", unembed="embed_out|lm_head"),
         "gpt_neox")
