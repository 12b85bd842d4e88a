"""Nomic-Embed-v2-style MoE text embedder: the whole model in one file.

Follows ../shared/spec/nomic-embed-v2-moe.md section 1 exactly (post-LN BERT, fused Wqkv, GPT-NeoX
rotary, exact GELU, MoE at odd layers with 8 experts top-2, router softmax in float32, top-k weights
NOT renormalised, one shared expert bias added once, masked mean pooling, Matryoshka truncation
after pooling, L2 normalisation). The BERT family's learned absolute positions are a config switch
(``position_embedding="learned"``) so that real BERT checkpoints (all-MiniLM-L6-v2) load and upcycle.

Dimension legend:
    B  batch            S  sequence length        D  hidden size (n_embd)
    nh heads            hs head size (D / nh)     F  FFN size (n_inner)
    E  experts          K  experts per token      T  tokens = B * S
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from moe2edge import kernels

NOMIC_PROMPTS = {
    # The trailing space is part of the prefix (spec section 1).
    "search_query": "search_query: ",
    "search_document": "search_document: ",
    "classification": "classification: ",
    "clustering": "clustering: ",
}


@dataclass
class TeacherConfig:
    """Architecture of an embedder of the Nomic-BERT family (dense or MoE)."""

    vocab_size: int = 250048  # XLM-R's 250,002 padded to a multiple of 64
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    position_embedding: str = "rotary"  # "rotary" (Nomic) | "learned" (BERT family)
    max_position_embeddings: int = 0  # size of the learned table; 0 with rotary
    rotary_base: float = 10000.0
    # MoE: layer i is MoE iff moe_every_n_layers > 0 and i % moe_every_n_layers == 1.
    moe_every_n_layers: int = 2
    num_experts: int = 8
    moe_top_k: int = 2
    moe_normalize_expert_weights: bool = False  # released: False (top-2 weights sum to ~0.7)
    router_aux_loss_coef: float = 0.1
    # Extension (not in the released format): a per-expert fc1 bias `experts.mlp.b1` (E*F,), so that
    # an upcycled model can keep its dense parent's fc1 bias and equal it exactly at step 0.
    moe_expert_fc1_bias: bool = False
    pad_token_id: int = 1
    max_seq_length: int = 512  # inference truncation length
    matryoshka_dims: tuple[int, ...] = (768, 256)
    prompts: dict[str, str] = field(default_factory=lambda: dict(NOMIC_PROMPTS))
    # Training-only switches (never change inference math).
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.position_embedding not in ("rotary", "learned"):
            raise ValueError(f"position_embedding must be 'rotary' or 'learned', got {self.position_embedding!r}")
        if self.position_embedding == "learned" and self.max_position_embeddings < 1:
            raise ValueError("learned positions need max_position_embeddings >= 1")
        if self.num_experts and not 1 <= self.moe_top_k <= self.num_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be in [1, num_experts={self.num_experts}]")
        self.matryoshka_dims = tuple(int(d) for d in self.matryoshka_dims)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_moe_layer(self, i: int) -> bool:
        n = self.moe_every_n_layers
        return self.num_experts > 0 and n > 0 and i % n == 1

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def replace(self, **changes) -> "TeacherConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["matryoshka_dims"] = list(self.matryoshka_dims)
        return d


# Named presets (house style: presets in a dict beside the config).
PRESETS: dict[str, TeacherConfig] = {
    # The released checkpoint's shape: 475,292,928 params, 305,423,616 active per token.
    "nomic-embed-text-v2-moe": TeacherConfig(),
    # all-MiniLM-L6-v2's shape (BERT, learned positions, dense); vocab is its WordPiece.
    "minilm-l6-dense": TeacherConfig(
        vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
        type_vocab_size=2, layer_norm_eps=1e-12, position_embedding="learned",
        max_position_embeddings=512, moe_every_n_layers=0, num_experts=0, pad_token_id=0,
        max_seq_length=256, matryoshka_dims=(384, 128),
    ),
    # Small shapes for tests and CPU work (same code paths as the released model).
    "tiny-moe": TeacherConfig(
        vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128,
        num_experts=8, moe_top_k=2, max_seq_length=128, matryoshka_dims=(64, 32),
    ),
    "small-moe": TeacherConfig(
        vocab_size=250048, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
        num_experts=8, moe_top_k=2, max_seq_length=512, matryoshka_dims=(256, 64),
    ),
}


def get_preset(name: str, **overrides) -> TeacherConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, device, dtype=torch.float32):
    """GPT-NeoX rotary tables over the whole head, positions 0..S-1. Returns cos, sin: (S, hs)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (S, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (S, hs): half-split layout, not interleaved
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)  # NeoX: cat(-x2, x1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, S, hs); cos/sin: (S, hs)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.cfg = cfg
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # rows = [Wq; Wk; Wv]
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, attn_bias, rope):
        B, S, D = x.shape
        nh, hs = self.cfg.num_heads, self.cfg.head_dim
        qkv = self.Wqkv(x)  # (B, S, 3D), layout [q | k | v], heads contiguous in each
        q, k, v = qkv.view(B, S, 3, nh, hs).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, S, hs)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # (B, nh, S, hs); scale 1/sqrt(hs)
        a = a.transpose(1, 2).reshape(B, S, D)  # (B, S, D)
        return self.out_proj(a)


class DenseMLP(nn.Module):
    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x, mask=None):
        return self.fc2(F.gelu(self.fc1(x))), None  # exact (erf) GELU


class RouterStats(NamedTuple):
    """Per-MoE-layer routing statistics over the real (unmasked) tokens of one forward."""

    counts: torch.Tensor  # (E,) float: assignments per expert (top-k picks)
    prob_sum: torch.Tensor  # (E,) fp32: summed router probabilities (keeps the gradient)
    num_tokens: torch.Tensor  # () float: real tokens routed


class Router(nn.Module):
    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.layer = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)


class ExpertWeights(nn.Module):
    """megablocks' parameter layout: w1, w2 as (E*F, H); expert axis outermost."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.num_experts, self.ffn = cfg.num_experts, cfg.intermediate_size
        self.w1 = nn.Parameter(torch.empty(cfg.num_experts * cfg.intermediate_size, cfg.hidden_size))
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts * cfg.intermediate_size, cfg.hidden_size))
        nn.init.normal_(self.w1, std=0.02)
        nn.init.normal_(self.w2, std=0.02)
        if cfg.moe_expert_fc1_bias:
            self.b1 = nn.Parameter(torch.zeros(cfg.num_experts * cfg.intermediate_size))

    def views(self):
        """(w1, w2, b1) as (E, F, H), (E, F, H), (E, F) | None; w2 is NOT (E, H, F) (spec trap)."""
        E, Fd = self.num_experts, self.ffn
        b1 = self.b1.view(E, Fd) if hasattr(self, "b1") else None
        return self.w1.view(E, Fd, -1), self.w2.view(E, Fd, -1), b1


class Experts(nn.Module):
    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.mlp = ExpertWeights(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size))  # ONE bias shared by all experts


class MoEMLP(nn.Module):
    """Token-choice, dropless top-k MoE FFN (spec section 1, 'MoE for each token')."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg)

    def forward(self, x, mask=None):
        B, S, D = x.shape
        h = x.reshape(B * S, D)  # (T, D); pads are routed too (does not change real tokens)
        probs, weights, experts = kernels.route(
            self.router.layer(h), self.cfg.moe_top_k, self.cfg.moe_normalize_expert_weights
        )  # (T, E) fp32, (T, K) fp32, (T, K) int64
        w1, w2, b1 = self.experts.mlp.views()
        out = kernels.moe_mlp(h, weights, experts, w1, w2, b1) + self.experts.bias  # bias added once
        return out.view(B, S, D), self._stats(probs, experts, mask)

    def _stats(self, probs, experts, mask) -> RouterStats:
        E = self.cfg.num_experts
        real = mask.reshape(-1).to(probs.dtype) if mask is not None else probs.new_ones(probs.shape[0])  # (T,)
        onehot = F.one_hot(experts, E).to(probs.dtype).sum(dim=1)  # (T, E): picks per token
        counts = (onehot * real[:, None]).sum(0).detach()
        prob_sum = (probs * real[:, None]).sum(0)
        return RouterStats(counts, prob_sum, real.sum().detach())


class Block(nn.Module):
    """Post-LN block: h = norm1(x + attn(x)); x = norm2(h + ffn(h))."""

    def __init__(self, cfg: TeacherConfig, moe: bool):
        super().__init__()
        self.attn = Attention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MoEMLP(cfg) if moe else DenseMLP(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, attn_bias, rope, mask):
        h = self.norm1(x + self.attn(x, attn_bias, rope))
        f, stats = self.mlp(h, mask)
        return self.norm2(h + f), stats


class Embeddings(nn.Module):
    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        if cfg.position_embedding == "learned":
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)

    def forward(self, input_ids):
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]  # (B, S, D); type 0 only
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings.weight[: input_ids.shape[1]]
        return x


class EncoderLayers(nn.Module):
    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_layers))


class EncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, S, D)
    router_stats: list  # one RouterStats per MoE layer, in layer order


class EmbeddingOutput(NamedTuple):
    embeddings: torch.Tensor  # (B, dim), L2-normalised
    pooled: torch.Tensor  # (B, D) masked mean, before truncation / normalisation
    router_stats: list


class NomicMoE(nn.Module):
    """The embedder. Parameter names equal the released checkpoint's tensor names (spec section 2)."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.emb_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = EncoderLayers(cfg)
        for m in self.modules():  # BERT-style init: N(0, 0.02) weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- encoder ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderOutput:
        cfg = self.config
        B, S = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.emb_ln(self.embeddings(input_ids))  # (B, S, D)
        # Additive key-padding bias (B, 1, 1, S): 0 for real keys, dtype-min for pads.
        keep = attention_mask.bool()[:, None, None, :]
        attn_bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        rope = None
        if cfg.position_embedding == "rotary":
            rope = rotary_cos_sin(S, cfg.head_dim, cfg.rotary_base, x.device, torch.float32)
            rope = (rope[0].to(x.dtype), rope[1].to(x.dtype))
        stats = []
        for block in self.encoder.layers:
            if cfg.gradient_checkpointing and self.training:
                x, st = torch.utils.checkpoint.checkpoint(block, x, attn_bias, rope, attention_mask, use_reentrant=False)
            else:
                x, st = block(x, attn_bias, rope, attention_mask)
            if st is not None:
                stats.append(st)
        return EncoderOutput(x, stats)

    # -- embedder ---------------------------------------------------------------------------
    def embed(self, input_ids, attention_mask=None, dim: int | None = None) -> EmbeddingOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self(input_ids, attention_mask)
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        return EmbeddingOutput(truncate_normalize(pooled, dim), pooled, out.router_stats)

    # -- bookkeeping -------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_parameters(self) -> int:
        """Parameters touched per token: all but the (E - K) unpicked experts of each MoE layer."""
        total = self.num_parameters()
        cfg = self.config
        per_expert = 2 * cfg.intermediate_size * cfg.hidden_size
        return total - len(cfg.moe_layers) * (cfg.num_experts - cfg.moe_top_k) * per_expert


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Attention-mask-weighted mean over tokens: (B, S, D), (B, S) -> (B, D)."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, S, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def truncate_normalize(pooled: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Matryoshka: keep the first `dim` coordinates AFTER pooling, then L2-normalise."""
    if dim is not None:
        if not 1 <= dim <= pooled.shape[-1]:
            raise ValueError(f"dim must be in [1, {pooled.shape[-1]}], got {dim}")
        pooled = pooled[..., :dim]
    return F.normalize(pooled, p=2, dim=-1)


def load_balancing_loss(stats: list[RouterStats], cfg: TeacherConfig, coef: float | None = None) -> torch.Tensor:
    """megablocks-form auxiliary loss (spec section 3):
    coef * E / (L * T * k) * sum_l sum_e count[l, e] * meanprob[l, e]; equals coef at perfect balance.
    """
    coef = cfg.router_aux_loss_coef if coef is None else coef
    if not stats:
        return torch.zeros(())
    L, E, k = len(stats), cfg.num_experts, cfg.moe_top_k
    total = 0.0
    for st in stats:
        T = st.num_tokens.clamp(min=1)
        meanprob = st.prob_sum / T  # (E,)
        total = total + (st.counts * meanprob).sum() / T
    return coef * E / (L * k) * total


def expert_load(stats: list[RouterStats]) -> torch.Tensor:
    """Fraction of assignments per expert, (L, E); rows sum to 1."""
    c = torch.stack([s.counts for s in stats]).float()
    return c / c.sum(-1, keepdim=True).clamp(min=1)
