"""The decode kernel: project directions through the unembedding, keep top/bottom tokens and moments.

Kept apart from the stage so that `atlas bench decode` times exactly the code the build runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

STATS = ("logit_mean", "logit_std", "logit_skew", "logit_kurtosis")


@dataclass
class Decoded:
    """Results for ``n`` directions, on the CPU."""

    top_ids: torch.Tensor       # [n, top_k] int64, largest logit first
    top_logits: torch.Tensor    # [n, top_k] float32
    top_probs: torch.Tensor     # [n, top_k] float32, softmax over the whole vocabulary
    bottom_ids: torch.Tensor    # [n, bottom_k] int64, most negative logit first
    bottom_logits: torch.Tensor
    bottom_probs: torch.Tensor
    stats: torch.Tensor         # [n, 4]: mean, std, skew, excess kurtosis of the logit vector


@dataclass
class Unembedding:
    """``W_U`` with the final norm's gain folded in and split into its mean row and the rest.

    Logits are ``W_U g v = W_c v + u.v``: multiplying by the centred ``W_c`` gives logits with
    their row mean already removed, so the moments need no extra centring pass, and the mean
    itself is one cheap dot product per direction.
    """

    W_c_T: torch.Tensor   # [d_model, vocab]
    u: torch.Tensor       # [d_model]

    @classmethod
    def build(cls, W_U: torch.Tensor, final_gain: torch.Tensor, device, dtype) -> "Unembedding":
        W = W_U.to(device=device, dtype=torch.float32) * final_gain.to(device, torch.float32)
        u = W.mean(dim=0)
        return cls((W - u).T.contiguous().to(dtype), u.to(dtype))

    @property
    def vocab(self) -> int:
        return self.W_c_T.shape[1]


def chunk_rows(vocab: int, budget_bytes: int) -> int:
    """Rows per chunk so that about three float32 [rows, vocab] buffers fit in the budget."""
    return max(1, budget_bytes // (3 * vocab * 4))


def _moments(x: torch.Tensor, x_max: torch.Tensor, vocab: int) -> tuple[torch.Tensor, ...]:
    """Second to fourth moments and log-sum-exp of centred logits ``x`` (overwritten)."""
    x = x.float()
    x2 = x.square()
    m2 = x2.sum(dim=1).div_(vocab)
    m3 = torch.linalg.vecdot(x2, x).div_(vocab)
    m4 = torch.linalg.vecdot(x2, x2).div_(vocab)
    # log-sum-exp around the maximum, which topk already found.
    lse = x.sub_(x_max).exp_().sum(dim=1, keepdim=True).log_().add_(x_max)   # [c, 1]
    return m2, m3, m4, lse


@torch.inference_mode()
def decode_directions(V: torch.Tensor, U: Unembedding, top_k: int, bottom_k: int,
                      chunk: int, stats_rows: int = 0) -> Decoded:
    """Decode directions ``V`` [n, d_model] as the LM head would read them.

    Memory is bounded by ``chunk`` x vocab whatever ``n`` is; the kernel never leaves the
    device until the per-chunk results (a few numbers per direction) are copied out.
    ``stats_rows`` (0: the whole chunk) cuts the elementwise passes into slices of that many
    rows, so that on a CPU a large chunk feeds the matmul while each slice stays in cache.
    """
    V = V.to(device=U.W_c_T.device, dtype=U.W_c_T.dtype)
    out: dict[str, list[torch.Tensor]] = {f.name: [] for f in fields(Decoded)}
    for start in range(0, V.shape[0], chunk):
        v = V[start:start + chunk]                                   # [c, d_model]
        x = v @ U.W_c_T                                              # [c, vocab], centred logits
        mean = (v @ U.u).float()                                     # [c]
        top = x.topk(top_k, dim=1)
        bottom = x.topk(bottom_k, dim=1, largest=False)
        step = stats_rows or x.shape[0]
        x_max = top.values[:, :1].float()
        parts = [_moments(x[i:i + step], x_max[i:i + step], U.vocab) for i in range(0, x.shape[0], step)]
        m2, m3, m4, lse = (torch.cat(p) for p in zip(*parts))
        var = m2.clamp_min(torch.finfo(torch.float32).tiny)
        stats = torch.stack([mean, m2.sqrt(), m3 / var.pow(1.5), m4 / var.square() - 3.0], dim=1)
        tl, bl = top.values.float(), bottom.values.float()
        for name, t in (("top_ids", top.indices), ("top_logits", tl + mean[:, None]),
                        ("top_probs", (tl - lse).exp()), ("bottom_ids", bottom.indices),
                        ("bottom_logits", bl + mean[:, None]), ("bottom_probs", (bl - lse).exp()),
                        ("stats", stats)):
            out[name].append(t.to("cpu", non_blocking=True))
    if V.device.type == "cuda":
        torch.cuda.synchronize(V.device)
    return Decoded(**{k: torch.cat(v) for k, v in out.items()})


@torch.inference_mode()
def bare_matmul_topk(V: torch.Tensor, U: Unembedding, top_k: int, bottom_k: int, chunk: int) -> None:
    """The bound decode is measured against: the same matmuls and top-k, nothing more."""
    V = V.to(device=U.W_c_T.device, dtype=U.W_c_T.dtype)
    for start in range(0, V.shape[0], chunk):
        x = V[start:start + chunk] @ U.W_c_T
        x.topk(top_k, dim=1)
        x.topk(bottom_k, dim=1, largest=False)
    if V.device.type == "cuda":
        torch.cuda.synchronize(V.device)
