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
