"""An independent, straightforward implementation of the spec's equations (spec section 1).

Written from ../shared/spec/nomic-embed-v2-moe.md alone, separate from the model code: it reads the
raw tensors by their checkpoint names and computes one sequence at a time, one token at a time, in
float64 numpy. Flags re-create each known trap so tests can show every one of them changes the output.
"""

from __future__ import annotations

import math

import numpy as np


def _layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x, tanh=False):
    if tanh:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _rope(x, pos, base):
    """x: (hs,) one head of one token; GPT-NeoX half split."""
    hs = x.shape[0]
    half = hs // 2
    out = np.empty_like(x)
    for i in range(half):
        theta = pos / (base ** (2 * i / hs))
        c, s = math.cos(theta), math.sin(theta)
        x1, x2 = x[i], x[i + half]
        out[i] = x1 * c - x2 * s
        out[i + half] = x2 * c + x1 * s
    return out


def reference_embed(
    sd: dict, cfg: dict, ids: list[int], *, dim=None, renormalize=False, bias_inside=False,
    w2_transposed_view=False, tanh_gelu=False, return_hidden=False,
):
    """Embed ONE sequence (no padding needed: masked mean over real tokens == mean over the sequence).

    sd: name -> float64 numpy array (checkpoint names); cfg: config.json dict (released keys).
    """
    H, L, nh = cfg["n_embd"], cfg["n_layer"], cfg["n_head"]
    Fd, E, k = cfg["n_inner"], cfg.get("num_experts", 0), cfg.get("moe_top_k", 1)
    eps, base = cfg["layer_norm_epsilon"], cfg["rotary_emb_base"]
    hs = H // nh
    S = len(ids)
    x = np.stack([sd["embeddings.word_embeddings.weight"][t] + sd["embeddings.token_type_embeddings.weight"][0] for t in ids])
    x = _layernorm(x, sd["emb_ln.weight"], sd["emb_ln.bias"], eps)
    for i in range(L):
        p = f"encoder.layers.{i}."
        Wqkv, bqkv = sd[p + "attn.Wqkv.weight"], sd[p + "attn.Wqkv.bias"]
        qkv = np.stack([Wqkv @ x[t] + bqkv for t in range(S)])  # (S, 3H)
        att = np.zeros((S, H))
        for h in range(nh):
            q = [_rope(qkv[t, h * hs:(h + 1) * hs], t, base) for t in range(S)]
            kk = [_rope(qkv[t, H + h * hs:H + (h + 1) * hs], t, base) for t in range(S)]
            v = [qkv[t, 2 * H + h * hs:2 * H + (h + 1) * hs] for t in range(S)]
            for t in range(S):
                scores = np.array([q[t] @ kk[j] / math.sqrt(hs) for j in range(S)])
                w = np.exp(scores - scores.max())
                w /= w.sum()
                att[t, h * hs:(h + 1) * hs] = sum(w[j] * v[j] for j in range(S))
        a = np.stack([sd[p + "attn.out_proj.weight"] @ att[t] + sd[p + "attn.out_proj.bias"] for t in range(S)])
        hdn = _layernorm(x + a, sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        f = np.zeros((S, H))
        moe = E > 0 and cfg.get("moe_every_n_layers", 0) > 0 and i % cfg["moe_every_n_layers"] == 1
        for t in range(S):
            if not moe:
                u = _gelu(sd[p + "mlp.fc1.weight"] @ hdn[t] + sd[p + "mlp.fc1.bias"], tanh_gelu)
                f[t] = sd[p + "mlp.fc2.weight"] @ u + sd[p + "mlp.fc2.bias"]
                continue
            logits = sd[p + "mlp.router.layer.weight"] @ hdn[t]
            prob = np.exp(logits - logits.max())
            prob /= prob.sum()
            top = np.argsort(-prob, kind="stable")[:k]
            gates = prob[top] / (prob[top].sum() if renormalize else 1.0)
            W1 = sd[p + "mlp.experts.mlp.w1"].reshape(E, Fd, H)
            W2 = sd[p + "mlp.experts.mlp.w2"]
            bias = sd[p + "mlp.experts.bias"]
            for g, e in zip(gates, top):
                u = _gelu(W1[e] @ hdn[t], tanh_gelu)  # (F,)
                if w2_transposed_view:  # the trap: view as (E, H, F) and apply as a Linear
                    y = W2.reshape(E, H, Fd)[e] @ u
                else:
                    y = W2.reshape(E, Fd, H)[e].T @ u  # stored [F, H], applied un-transposed
                f[t] += g * (y + bias if bias_inside else y)
            if not bias_inside:
                f[t] += bias  # ONE shared bias, once
        x = _layernorm(hdn + f, sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
    if return_hidden:
        return x
    pooled = x.mean(0)
    if dim is not None:
        pooled = pooled[:dim]
    return pooled / np.linalg.norm(pooled)
