"""Input checks shared by every ``encode`` (teacher, students, torch-free engines): no torch here."""

from __future__ import annotations


def check_texts(texts) -> list[str]:
    """A list of str (UTF-8 bytes are decoded); a clear error naming the offending index otherwise."""
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of strings; wrap a single text in a list")
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, (bytes, bytearray)):
            try:
                t = bytes(t).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"text {i} is not valid UTF-8 ({e}); decode it before encoding") from None
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, expected str")
        out.append(t)
    return out


def check_encode_args(dim: int | None, full_dim: int, batch_size: int) -> int:
    """Validate Matryoshka ``dim`` and ``batch_size``; returns the output dimension."""
    if dim is not None and not 1 <= dim <= full_dim:
        raise ValueError(f"dim must be in [1, {full_dim}], got {dim}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return dim or full_dim


# A token is rarely shorter than one character; cutting the raw text at this many characters per
# allowed token before tokenising keeps a multi-megabyte input from costing seconds, and changes
# nothing for the tokens that survive truncation.
_CHARS_PER_TOKEN_CAP = 32


class Tokenizer:
    """``tokenizers.Tokenizer`` from tokenizer.json with the model's truncation and padding.

    Returns numpy int64 arrays (torch-free, so compiled engines use it too); the teacher's subclass
    converts to torch tensors.
    """

    def __init__(self, path, *, max_length: int, pad_id: int):
        from pathlib import Path

        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: tokenizer.json not found")
        self.dir = file.parent
        self.tok = HFTokenizer.from_file(str(file))
        self.max_length, self.pad_id = max_length, pad_id
        self.tok.enable_truncation(max_length=max_length)
        self.tok.enable_padding(pad_id=pad_id, pad_token=self.tok.id_to_token(pad_id) or "<pad>")

    def __call__(self, texts: list[str]):
        """-> input_ids (B, S) int64, attention_mask (B, S) int64, number of truncated texts."""
        import numpy as np

        cap = self.max_length * _CHARS_PER_TOKEN_CAP
        encs = self.tok.encode_batch([t[:cap] for t in texts])
        truncated = sum(1 for t, e in zip(texts, encs) if e.overflowing or len(t) > cap)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask, truncated

    def count_tokens(self, texts: str | list[str]) -> int | list[int]:
        """Tokens the model runs on (specials included, after truncation): an int for one str, a list
        for a list (a str is never iterated as characters)."""
        if isinstance(texts, str):
            return sum(self.tok.encode(texts).attention_mask)
        return [sum(e.attention_mask) for e in self.tok.encode_batch(list(texts))]
