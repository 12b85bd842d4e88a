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


# Verification texts must be real text (issue: 12 whitespace-only pairs "verified" an engine at nDCG 1.0):
# enough pairs, no empty texts, documents of sentence length, few duplicates. Checked for every compile.
MIN_VERIFY_PAIRS = 10
MIN_TEXT_CHARS = 3  # non-space characters per query / document
MIN_MEAN_DOC_CHARS = 20
MAX_DUPLICATE_FRACTION = 0.2  # of queries, and of documents (after lower-casing and collapsing spaces)


def check_text_pairs(pairs, *, where: str = "verification pairs") -> None:
    """Refuse (ValueError) a verification set that cannot tell a good engine from a bad one; the message
    states every threshold."""
    rule = (f"verification needs >= {MIN_VERIFY_PAIRS} (query, document) pairs of real text: each text >= "
            f"{MIN_TEXT_CHARS} non-space characters, documents >= {MIN_MEAN_DOC_CHARS} characters on average, "
            f"<= {MAX_DUPLICATE_FRACTION:.0%} duplicate queries or documents")
    n = len(pairs)
    empty = [i for i, (q, d) in enumerate(pairs) if min(len("".join(q.split())), len("".join(d.split()))) < MIN_TEXT_CHARS]
    if empty:
        raise ValueError(f"{where}: {len(empty)} of {n} pairs have an empty or near-empty text (first: pair "
                         f"{empty[0] + 1}); {rule}")
    if n < MIN_VERIFY_PAIRS:
        raise ValueError(f"{where}: {n} pairs; {rule}")
    mean_doc = sum(len(d.strip()) for _, d in pairs) / n
    if mean_doc < MIN_MEAN_DOC_CHARS:
        raise ValueError(f"{where}: documents are {mean_doc:.1f} characters on average; {rule}")
    for k, name in ((0, "queries"), (1, "documents")):
        distinct = len({" ".join(p[k].lower().split()) for p in pairs})
        if 1 - distinct / n > MAX_DUPLICATE_FRACTION:
            raise ValueError(f"{where}: {n - distinct} of {n} {name} are duplicates; {rule}")


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
        if file.is_dir():
            raise IsADirectoryError(21, "is a folder, expected tokenizer.json", str(file))
        self.dir, self.file = file.parent, file
        try:
            self.tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for any bad file
            msg = " ".join(str(e).split())[:200]
            raise ValueError(f"{file}: not a valid tokenizer.json ({msg}); copy the tokenizer the model was "
                             "trained with") from None
        self.max_length, self.pad_id = max_length, pad_id
        self.tok.enable_truncation(max_length=max_length)
        self.tok.enable_padding(pad_id=pad_id, pad_token=self.tok.id_to_token(pad_id) or "<pad>")

    def check_fits(self, vocab_size: int) -> None:
        """Every id this tokenizer can produce indexes the model's embedding table (else the model would
        read past it: IndexError in PyTorch, Gather out of bounds in ONNX Runtime)."""
        n = self.tok.get_vocab_size(with_added_tokens=True)
        if n > vocab_size:
            raise ValueError(f"{self.file}: the tokenizer has {n} tokens but the model's embedding table has "
                             f"{vocab_size} rows (ids >= {vocab_size} would index past it); use the tokenizer the "
                             "model was trained with")

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
