"""Data steps of the recipe (spec section 3): consistency filtering and hard-negative mining.

Both take any encoder with the project's ``encode(texts, *, prompt, dim, batch_size)`` (the paper
used multilingual-e5-small, which ``moe2edge.data.encoders.E5Encoder`` wraps) and lists of ``Pair``.
"""

from __future__ import annotations

import logging

import numpy as np

from moe2edge.data.readers import Pair

log = logging.getLogger(__name__)


def _embed_pairs(pairs: list[Pair], encoder, batch_size: int):
    q = encoder.encode([p.query for p in pairs], prompt="search_query", batch_size=batch_size)
    d = encoder.encode([p.positive for p in pairs], prompt="search_document", batch_size=batch_size)
    return q, d


def consistency_filter(pairs: list[Pair], encoder, *, top_k: int = 2, shard_size: int = 100_000,
                       batch_size: int = 64) -> tuple[list[Pair], dict]:
    """Keep a pair only if its own document ranks in its query's top-k among the shard's documents.

    The paper embeds each 1M-pair shard and keeps pairs whose document is in the query's top-2.
    """
    if not pairs:
        raise ValueError("no pairs to filter")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    kept: list[Pair] = []
    for s in range(0, len(pairs), shard_size):
        shard = pairs[s : s + shard_size]
        q, d = _embed_pairs(shard, encoder, batch_size)
        for i in range(0, len(shard), 1024):
            scores = q[i : i + 1024] @ d.T  # (b, N)
            own = scores[np.arange(len(scores)), np.arange(i, i + len(scores))]
            rank = (scores > own[:, None]).sum(1)  # documents scoring strictly higher than the own one
            kept.extend(p for p, r in zip(shard[i : i + 1024], rank) if r < top_k)
    stats = {"input": len(pairs), "kept": len(kept), "dropped": len(pairs) - len(kept), "top_k": top_k}
    log.info("consistency filter: kept %d of %d pairs (own document in the query's top-%d)", len(kept), len(pairs),
             top_k)
    return kept, stats


def mine_hard_negatives(pairs: list[Pair], encoder, *, num_negatives: int = 4, candidates: int = 20,
                        margin: float = 0.95, batch_size: int = 64) -> tuple[list[Pair], dict]:
    """Attach hard negatives: of the query's top ``candidates`` documents (other pairs' positives),
    keep those scoring below ``margin`` x the positive's score (positive-aware, spec section 3).
    Pairs that end with fewer than ``num_negatives`` are dropped (counted in the stats).
    """
    if not pairs:
        raise ValueError("no pairs to mine")
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    if num_negatives < 1 or candidates < num_negatives:
        raise ValueError(f"need 1 <= num_negatives ({num_negatives}) <= candidates ({candidates})")
    docs = sorted({p.positive for p in pairs})
    doc_index = {t: i for i, t in enumerate(docs)}
    # A document paired with this very query elsewhere (Debian: the same short description paired with
    # its translated long text and with the English one) is a positive, never a negative.
    own: dict[str, set[int]] = {}
    for p in pairs:
        own.setdefault(p.query, set()).add(doc_index[p.positive])
    q = encoder.encode([p.query for p in pairs], prompt="search_query", batch_size=batch_size)
    d = encoder.encode(docs, prompt="search_document", batch_size=batch_size)
    out: list[Pair] = []
    too_few = filtered_by_margin = same_query = 0
    for i in range(0, len(pairs), 512):
        scores = q[i : i + 512] @ d.T  # (b, N)
        top = np.argsort(-scores, axis=1, kind="stable")[:, : candidates + 1]
        for j, p in enumerate(pairs[i : i + 512]):
            pos = doc_index[p.positive]
            pos_score = scores[j, pos]
            negs = []
            for c in top[j]:
                if c == pos:
                    continue
                if c in own[p.query]:
                    same_query += 1
                    continue
                if scores[j, c] >= margin * pos_score:  # likely a false negative: too close to the positive
                    filtered_by_margin += 1
                    continue
                negs.append(docs[c])
                if len(negs) == num_negatives:
                    break
            if len(negs) < num_negatives:
                too_few += 1
                continue
            out.append(Pair(p.query, p.positive, tuple(negs), p.language))
    stats = {"input": len(pairs), "kept": len(out), "dropped_too_few": too_few,
             "candidates_over_margin": filtered_by_margin, "candidates_paired_with_query": same_query,
             "margin": margin, "num_negatives": num_negatives}
    log.info("hard negatives: %d pairs with %d negatives each (%d dropped, %d candidates over the margin)",
             len(out), num_negatives, too_few, filtered_by_margin)
    return out, stats


class CachedEncoder:
    """Memoises ``encode`` per (prompt, text), so that filtering and mining the same pairs embed once."""

    def __init__(self, encoder):
        self.encoder, self.name = encoder, getattr(encoder, "name", type(encoder).__name__)
        self._cache: dict[tuple[str | None, str], np.ndarray] = {}

    def encode(self, texts, *, prompt=None, dim=None, batch_size=32):
        if dim is not None:
            raise ValueError("CachedEncoder caches full-dimension embeddings only")
        todo = list(dict.fromkeys(t for t in texts if (prompt, t) not in self._cache))
        if todo:
            for t, e in zip(todo, self.encoder.encode(todo, prompt=prompt, batch_size=batch_size)):
                self._cache[(prompt, t)] = e
        return np.stack([self._cache[(prompt, t)] for t in texts]) if texts else np.zeros((0, 0), np.float32)


def prepare_pairs(pairs: list[Pair], encoder, *, filter_top_k: int | None = 2, negatives: int = 0,
                  candidates: int = 20, margin: float = 0.95, batch_size: int = 64) -> tuple[list[Pair], dict]:
    """The paper's data steps in one pass: consistency filter, then hard-negative mining among the
    kept pairs; each text is embedded once. Either step is skipped with ``filter_top_k=None`` /
    ``negatives=0``."""
    enc = CachedEncoder(encoder)
    stats: dict = {"input": len(pairs)}
    if filter_top_k:
        pairs, stats["filter"] = consistency_filter(pairs, enc, top_k=filter_top_k, batch_size=batch_size)
    if negatives:
        pairs, stats["mine"] = mine_hard_negatives(pairs, enc, num_negatives=negatives, candidates=candidates,
                                                   margin=margin, batch_size=batch_size)
    stats["output"] = len(pairs)
    return pairs, stats


def write_pairs(path, pairs: list[Pair]) -> None:
    """JSONL (query, positive, negatives, language), atomically."""
    import json

    from moe2edge._io import atomic_write_text

    lines = [json.dumps({"query": p.query, "positive": p.positive, "negatives": list(p.negatives),
                         "language": p.language}, ensure_ascii=False) for p in pairs]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
