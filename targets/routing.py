"""Router near-ties: tokens whose top-k choice an fp32 rounding difference may legitimately flip.

A token-choice router picks the k most probable experts. When the k-th and the (k+1)-th router
probabilities of a token are closer than an engine's rounding error (fp32 engines differ from PyTorch
by ~1e-7 per value, more after a few layers), the engine may pick the other expert: that token's
output, and through attention its whole text's embedding, moves by far more than the rounding error
(cosine 0.98 measured at the released model's shape with random weights) without any bug.

``RouterTap`` hooks the routers of the PyTorch *reference* and counts, per text, the real tokens whose
top-k margin ``p_(k) - p_(k+1)`` is below ``eps`` in any MoE layer. Verification (``targets/build.py``)
reports those counts and gates fp32 engines on the texts without a near-tie (a wrong kernel moves
every text, so it is still caught); the near-tie texts get their own parity numbers in the manifest.

Dimension legend: B batch, S sequence, T = B*S tokens, E experts, K top-k.
"""

from __future__ import annotations

import numpy as np
import torch

# Router-probability margin below which a token counts as a near-tie. fp32 engines perturb router
# probabilities by ~1e-7..1e-6 at 12 layers x 768; 1e-5 leaves a 10x safety factor.
NEAR_TIE_EPS = 1e-5


def margins(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T,) gap between the k-th and the (k+1)-th router probability (fp32 softmax, as routed)."""
    probs = torch.softmax(logits.float(), dim=-1)  # (T, E)
    if probs.shape[-1] <= top_k:
        return torch.full(probs.shape[:1], float("inf"))
    top = probs.topk(top_k + 1, dim=-1).values  # (T, K+1) descending
    return top[:, top_k - 1] - top[:, top_k]


def moe_routers(model) -> list[tuple[torch.nn.Module, int]]:
    """[(router linear layer, top-k)] of every MoE layer of a NomicMoE-family model (empty when dense)."""
    out = []
    for m in model.modules():
        router = getattr(m, "router", None)
        if router is not None and hasattr(router, "layer") and hasattr(m, "cfg"):
            out.append((router.layer, int(m.cfg.moe_top_k)))
    return out


class RouterTap:
    """Forward hooks on the reference model's routers counting near-tie tokens per batch row.

        tap = RouterTap(model, eps=1e-5)
        with tap:
            emb = encode_batches(tap.wrap(run), tok, texts, ...)
        counts, min_margin = tap.take(texts)   # per text, in the order of ``texts``

    ``wrap(run)`` gives ``run(ids, mask)`` that records the batch's mask before running and its rows'
    counts after; ``take`` undoes ``encode_batches``' length sort (``runtime.length_order``)."""

    def __init__(self, model, *, eps: float = NEAR_TIE_EPS):
        self.eps, self.routers = float(eps), moe_routers(model)
        self._handles, self._mask = [], None
        self._rows_count: list[np.ndarray] = []
        self._rows_margin: list[np.ndarray] = []
        self._count = self._margin = None

    def __enter__(self):
        for layer, k in self.routers:
            self._handles.append(layer.register_forward_hook(self._hook(k)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, k: int):
        def hook(_module, _inputs, logits):
            if self._mask is None:
                return
            B, S = self._mask.shape
            real = self._mask.reshape(-1).bool()  # (T,)
            m = margins(logits.detach(), k)
            m = torch.where(real, m, torch.full_like(m, float("inf"))).view(B, S)
            self._count += (m < self.eps).sum(1).numpy()
            self._margin = np.minimum(self._margin, m.min(1).values.numpy())
        return hook

    def wrap(self, run):
        def tapped(ids, mask):
            self._mask = torch.as_tensor(np.asarray(mask))
            B = self._mask.shape[0]
            self._count, self._margin = np.zeros(B, np.int64), np.full(B, np.inf)
            try:
                out = run(ids, mask)
            finally:
                self._mask = None
            self._rows_count.append(self._count)
            self._rows_margin.append(self._margin)
            return out
        return tapped

    def take(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(near-tie token count, min top-k margin) per text of the last ``encode_batches`` call over ``texts``."""
        from moe2edge.targets.runtime import length_order

        order = length_order(texts)
        count, margin = np.zeros(len(texts), np.int64), np.full(len(texts), np.inf)
        if self._rows_count:
            count[order] = np.concatenate(self._rows_count)
            margin[order] = np.concatenate(self._rows_margin)
        self._rows_count, self._rows_margin = [], []
        return count, margin
