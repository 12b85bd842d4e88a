"""Static student (model2vec-style): one embedding row per vocabulary token, mean-pooled; no
transformer at run time.

    static = distill_static(teacher, dim=256, weighting="sif", corpus=texts)
    static.save("runs/students/static"); static = load_static("runs/students/static")
    static.encode(["how to ..."])   # same signature as the teacher's Embedder.encode

Recipe (MinishLab/model2vec ``distill``): embed every vocabulary token through the teacher
(``[CLS] tok [SEP]``, mean-pooled like the teacher pools a text), PCA to ``dim`` (the components
are ordered by variance, so Matryoshka truncation of the output keeps working), then weight each
row by token frequency: ``"zipf"`` assumes the vocabulary is frequency-ordered (model2vec's
default, p ~ 1/rank), ``"sif"`` counts tokens on a real corpus (a / (a + p), Arora et al. 2017).
``StaticModel`` is an ``nn.Module`` with the teacher's forward / embed interface so the teacher's
Trainer can fine-tune the table (tokenlearn-style distillation).

Folder format: ``model.safetensors`` (one tensor ``embeddings`` (V, d) float32), ``tokenizer.json``,
``config.json`` (``model_type: moe2edge_static``), ``student_manifest.json`` and ``moe2edge_files.json``
(every file's size and sha256, compared at load: ``moe2edge._integrity``).

Dimension legend: V vocabulary, d static dim, D teacher hidden size, B batch, S sequence.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from moe2edge.teacher.model import EmbeddingOutput, EncoderOutput, mean_pool, truncate_normalize

log = logging.getLogger(__name__)

MODEL_TYPE = "moe2edge_static"
WEIGHTINGS = ("none", "zipf", "sif")


@dataclass
class StaticConfig:
    """The few fields of TeacherConfig that the Trainer and Embedder read, for a lookup table."""

    vocab_size: int
    hidden_size: int  # the static dim d
    pad_token_id: int = 0
    max_seq_length: int = 512
    matryoshka_dims: tuple[int, ...] = ()
    prompts: dict[str, str] = field(default_factory=dict)
    router_aux_loss_coef: float = 0.0
    gradient_checkpointing: bool = False
    num_experts: int = 0
    moe_layers: list = field(default_factory=list)

    def __post_init__(self):
        self.matryoshka_dims = tuple(int(d) for d in (self.matryoshka_dims or (self.hidden_size,)))

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "pad_token_id": self.pad_token_id, "max_seq_length": self.max_seq_length,
                "matryoshka_dims": list(self.matryoshka_dims), "prompts": dict(self.prompts)}


class StaticModel(nn.Module):
    """Token table as a model: forward(ids, mask) -> EncoderOutput(table[ids], []) (trainable)."""

    def __init__(self, cfg: StaticConfig, table: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if table is not None:
            self.embeddings.weight.data.copy_(table)

    def forward(self, input_ids, attention_mask=None) -> EncoderOutput:
        return EncoderOutput(self.embeddings(input_ids), [])  # (B, S, d)

    def embed(self, input_ids, attention_mask=None, dim=None) -> EmbeddingOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pooled = mean_pool(self(input_ids).last_hidden_state, attention_mask)
        return EmbeddingOutput(truncate_normalize(pooled, dim), pooled, [])

    def num_parameters(self) -> int:
        return self.embeddings.weight.numel()

    def num_active_parameters(self) -> int:
        return self.num_parameters()


class StaticInt8Model(StaticModel):
    """The table stored as int8 with one symmetric scale per row (weight-only INT8, 4x smaller):
    row v = table_q[v] * scale[v]. Rows differ in magnitude by ~1000x after SIF weighting, so one
    scale per table would zero the frequent tokens; per row keeps each row's relative error < 0.4%.
    Exports to ONNX as Gather(int8) -> Cast -> Mul(Gather(scale)), which OpenVINO executes as a
    compressed-weight lookup."""

    def __init__(self, cfg: StaticConfig, table: torch.Tensor):
        nn.Module.__init__(self)
        self.config = cfg
        scale = table.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127.0  # (V, 1)
        self.register_buffer("table_q", torch.round(table / scale).clamp(-127, 127).to(torch.int8))  # (V, d)
        self.register_buffer("scale", scale.float())

    def forward(self, input_ids, attention_mask=None) -> EncoderOutput:
        rows = self.table_q[input_ids].float() * self.scale[input_ids]  # (B, S, d)
        return EncoderOutput(rows, [])

    def num_parameters(self) -> int:
        return self.table_q.numel()


class BertWordCache:
    """Exact fast path of a BERT-uncased WordPiece ``tokenizer.json`` for ASCII text, with a word cache.

    For a static student tokenisation IS the run time (HF ``tokenizers`` spends 0.35 ms normalising and
    pre-tokenising a 128-token text here; the lookup + mean takes 0.02 ms). For ASCII input BERT's
    pipeline is simple enough to replicate exactly: drop control characters, tab/newline/CR -> space,
    lowercase, split on whitespace and isolate ASCII punctuation, then WordPiece each word -- which the
    real tokenizer computes once per distinct word (cached). Non-ASCII text, or a tokenizer that is not
    exactly {BertNormalizer(lowercase), BertPreTokenizer, WordPiece, [CLS] $A [SEP]}, goes through HF
    ``tokenizers`` unchanged. Equality with HF on real text is tested.
    """

    _DROP = {c: None for c in list(range(0, 9)) + [11, 12] + list(range(14, 32)) + [127]}
    _SPACE = {9: 32, 10: 32, 13: 32}
    _WORDS = re.compile(r"[!-/:-@\[-`{-~]|[^\s!-/:-@\[-`{-~]+")

    def __init__(self, hf_tokenizer, tokenizer_json: dict, max_words_cached: int = 200_000):
        self.tok, self.cache, self.max_cached = hf_tokenizer, {}, max_words_cached
        self.table = {**self._DROP, **self._SPACE}
        specials = [hf_tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]")]
        self.cls, self.sep = specials
        self.enabled = self.applies(tokenizer_json) and None not in specials

    @staticmethod
    def applies(d: dict) -> bool:
        norm, pre, model = d.get("normalizer") or {}, d.get("pre_tokenizer") or {}, d.get("model") or {}
        post = d.get("post_processor") or {}
        single = [(x.get("SpecialToken") or x.get("Sequence") or {}).get("id") if isinstance(x, dict) else x
                  for x in post.get("single", [])]  # the template for one text: [CLS] $A [SEP]
        return (norm.get("type") == "BertNormalizer" and norm.get("lowercase") is True
                and norm.get("clean_text") is True and norm.get("strip_accents") in (None, True)
                and pre.get("type") == "BertPreTokenizer" and model.get("type") == "WordPiece"
                and post.get("type") == "TemplateProcessing" and single == ["[CLS]", "A", "[SEP]"])

    def _word(self, w: str) -> list[int]:
        ids = self.cache.get(w)
        if ids is None:
            ids = self.tok.encode(w, add_special_tokens=False).ids
            if len(self.cache) < self.max_cached:
                self.cache[w] = ids
        return ids

    def ids(self, text: str, max_length: int) -> list[int] | None:
        """[CLS] ... [SEP] ids truncated to ``max_length``, or None when the fast path does not apply."""
        if not self.enabled or not text.isascii():
            return None
        out = [self.cls]
        limit = max_length - 1
        for w in self._WORDS.findall(text.translate(self.table).lower()):
            out.extend(self._word(w))
            if len(out) >= limit:
                del out[limit:]
                break
        out.append(self.sep)
        return out


class UnigramWordCache:
    """Exact fast path of a SentencePiece-Unigram ``tokenizer.json`` (XLM-R / multilingual-e5), with a word cache.

    HF's pipeline here is: Precompiled charsmap (every whitespace character -> " "), collapse runs of spaces,
    Metaspace (" " -> "▁", one "▁" prepended unless the text starts with it), Unigram over the whole
    text, then ``<s> $A </s>``. No vocabulary piece has "▁" anywhere but first (checked), so every piece
    boundary falls before a "▁" and the best segmentation of the text is the concatenation of the best
    segmentations of its "▁word" pieces. So: the whole text is normalised by HF's own normaliser (exact),
    split at spaces, and each new "▁word" is segmented once by HF's own Unigram model (``model.tokenize``:
    no Encoding, offsets or post-processing built, ~9 us) and cached. A tokenizer that does not match exactly
    goes through HF unchanged. Equality with HF on real multilingual text is tested; HF's full ``encode``
    takes ~1 ms for a 135-token text here."""

    def __init__(self, hf_tokenizer, tokenizer_json: dict, max_words_cached: int = 500_000):
        self.tok, self.cache, self.max_cached = hf_tokenizer, {}, max_words_cached
        ids = [hf_tokenizer.token_to_id(t) for t in ("<s>", "</s>")]
        self.cls, self.sep = ids
        self.enabled = self.applies(tokenizer_json) and None not in ids
        if self.enabled:
            self.normalize = hf_tokenizer.normalizer.normalize_str
            self.tokenize = hf_tokenizer.model.tokenize

    @staticmethod
    def applies(d: dict) -> bool:
        norm, pre, model = d.get("normalizer") or {}, d.get("pre_tokenizer") or {}, d.get("model") or {}
        post = d.get("post_processor") or {}
        steps = norm.get("normalizers") if norm.get("type") == "Sequence" else None
        single = [(x.get("SpecialToken") or x.get("Sequence") or {}).get("id") if isinstance(x, dict) else x
                  for x in post.get("single", [])]
        ok = (isinstance(steps, list) and len(steps) == 2 and steps[0].get("type") == "Precompiled"
              and steps[1].get("type") == "Replace" and steps[1].get("pattern") == {"Regex": " {2,}"}
              and steps[1].get("content") == " "
              and pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581"
              and pre.get("prepend_scheme") == "always" and model.get("type") == "Unigram"
              and not model.get("byte_fallback") and model.get("unk_id") is not None
              and post.get("type") == "TemplateProcessing" and single == ["<s>", "A", "</s>"]
              and not any(t.get("special") is False for t in d.get("added_tokens") or []))
        # Separability: a piece with an inner "▁" could span two words.
        return ok and not any("\u2581" in p[1:] for p, _ in model.get("vocab") or [])

    def _word(self, w: str) -> list[int]:
        ids = self.cache.get(w)
        if ids is None:
            ids = [t.id for t in self.tokenize(w)]  # HF's own Unigram on one "▁word"
            if len(self.cache) < self.max_cached:
                self.cache[w] = ids
        return ids

    def ids(self, text: str, max_length: int) -> list[int] | None:
        """<s> ... </s> ids truncated to ``max_length``, or None when the fast path does not apply."""
        if not self.enabled:
            return None
        norm = self.normalize(text)
        if not norm:
            return None  # nothing left: HF decides
        words = norm.split(" ")
        if words[0] == "":  # a leading space becomes the first "▁", none is prepended
            words = words[1:]
        out = [self.cls]
        limit = max_length - 1
        for w in words:
            out.extend(self._word("\u2581" + w))
            if len(out) >= limit:
                del out[limit:]
                break
        out.append(self.sep)
        return out


class StaticEmbedder:
    """numpy-only inference: tokenise, look up, mean, L2-normalise. ``encode`` = Embedder.encode."""

    def __init__(self, table: np.ndarray, tokenizer_file: str | Path, cfg: StaticConfig, *, name: str = "static"):
        from moe2edge._text import Tokenizer as _Checked

        self.table = np.ascontiguousarray(table, dtype=np.float32)  # (V, d)
        self.config = cfg

        self.tokenizer_file = Path(tokenizer_file)
        checked = _Checked(self.tokenizer_file, max_length=cfg.max_seq_length, pad_id=cfg.pad_token_id)  # names a bad file
        checked.check_fits(cfg.vocab_size)  # ids past the table would be an IndexError in numpy
        self.tok = checked.tok
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=cfg.max_seq_length)
        spec = json.loads(self.tok.to_str())
        self.fast = BertWordCache(self.tok, spec)
        if not self.fast.enabled:
            self.fast = UnigramWordCache(self.tok, spec)
        self.name = name
        self.manifest: dict = {}

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    @property
    def num_parameters(self) -> int:  # eval's model_info reads an int attribute
        return int(self.table.size)

    def prefix(self, prompt: str | None) -> str:
        if prompt is None or not self.config.prompts:
            return ""
        if prompt not in self.config.prompts:
            raise ValueError(f"unknown prompt {prompt!r}; this model knows: {', '.join(self.config.prompts)}")
        return self.config.prompts[prompt]

    def count_tokens(self, texts: str | list[str]) -> int | list[int]:
        """Tokens (specials included) the table averages: one int for a str, a list for a list."""
        if isinstance(texts, str):
            return len(self.tok.encode(texts).ids)
        return [len(e.ids) for e in self.tok.encode_batch(list(texts))]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text (specials included, truncated): the cached fast path where it applies."""
        seqs = [self.fast.ids(t, self.config.max_seq_length) for t in texts]
        slow = [i for i, x in enumerate(seqs) if x is None]
        if slow:
            for i, e in zip(slow, self.tok.encode_batch([texts[i] for i in slow])):
                seqs[i] = e.ids
        return seqs

    def set_num_threads(self, n: int) -> None:
        """Lookup + mean is single-threaded numpy; nothing to set (kept for measure_latency)."""

    def encode(self, texts, *, prompt: str | None = None, dim: int | None = None, batch_size: int = 32,
               show_progress: bool | None = None) -> np.ndarray:
        """Embed texts -> (N, dim) float32, L2-normalised after Matryoshka truncation."""
        from moe2edge._text import check_encode_args, check_texts

        texts = check_texts(texts)
        d = check_encode_args(dim, self.dim, batch_size)
        out = np.empty((len(texts), d), dtype=np.float32)
        pre = self.prefix(prompt)
        table = self.table[:, :d]
        for s in range(0, len(texts), batch_size):
            seqs = self.token_ids([pre + t for t in texts[s:s + batch_size]])
            lens = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=len(seqs))  # (B,)
            ids = np.fromiter((i for x in seqs for i in x), dtype=np.int64, count=int(lens.sum()))
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])  # (B,)
            sums = np.add.reduceat(table[ids], starts, axis=0) if len(ids) else np.zeros((len(seqs), d), np.float32)
            out[s:s + len(seqs)] = sums / np.maximum(lens, 1)[:, None]  # (B, d) mean of the token rows
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    # -- I/O ---------------------------------------------------------------------------------
    def save(self, path: str | Path, *, manifest: dict | None = None, extra_files: dict | None = None,
             force: bool = False) -> Path:
        """Write the folder atomically, every file listed with size + sha256; an existing ``path`` is replaced
        only if it is a student folder this tool wrote (else ``force``)."""
        from safetensors.numpy import save_file

        from moe2edge._integrity import FILES_MANIFEST, write_files_manifest
        from moe2edge._io import atomic_dir

        path = Path(path)
        with atomic_dir(path, kinds=("student",), force=force) as tmp:
            save_file({"embeddings": self.table}, str(tmp / "model.safetensors"), metadata={"format": "np"})
            (tmp / "config.json").write_text(json.dumps({**self.config.to_dict(), "files": FILES_MANIFEST},
                                                        indent=2) + "\n")
            shutil.copy2(self.tokenizer_file, tmp / "tokenizer.json")
            if manifest is not None or self.manifest:
                (tmp / "student_manifest.json").write_text(
                    json.dumps(manifest or self.manifest, indent=2, ensure_ascii=False) + "\n")
            for name, obj in (extra_files or {}).items():
                (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
            write_files_manifest(tmp, kind="student")
        log.info("saved static student %s", path)
        return path

    def to_model(self) -> StaticModel:
        return StaticModel(self.config, torch.from_numpy(self.table.copy()))


def is_static(path: str | Path) -> bool:
    f = Path(path) / "config.json"
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no folder, no file, not JSON: not a static student (the loader says why)
        return False
    return isinstance(d, dict) and d.get("model_type") == MODEL_TYPE


_CONFIG_TYPES = {"vocab_size": int, "hidden_size": int, "pad_token_id": int, "max_seq_length": int,
                 "matryoshka_dims": list, "prompts": dict}


def load_static(path: str | Path, *, check: bool | None = None) -> StaticEmbedder:
    """Load a static student folder; its files are compared with ``moe2edge_files.json`` first (``check`` as
    in ``moe2edge.teacher.checkpoint.load_pretrained``)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from moe2edge._integrity import check_folder
    from moe2edge._io import read_json_file
    from moe2edge.teacher.checkpoint import CheckpointError

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: {'is a file, not' if path.exists() else 'no such'} student folder")
    cfg_file = path / "config.json"
    try:
        cfg_d = read_json_file(cfg_file, "static student config", expect=dict)
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    if cfg_d.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{cfg_file}: model_type {cfg_d.get('model_type')!r} is not {MODEL_TYPE!r}")
    integrity = check_folder(path, check=check, required="files" in cfg_d)
    cfg_d = {k: v for k, v in cfg_d.items() if k not in ("model_type", "files")}
    unknown = sorted(set(cfg_d) - set(_CONFIG_TYPES))
    if unknown:
        raise CheckpointError(f"{cfg_file}: unknown keys {unknown}; expected {sorted(_CONFIG_TYPES)}")
    for k, typ in _CONFIG_TYPES.items():
        if k in cfg_d and (not isinstance(cfg_d[k], typ) or isinstance(cfg_d[k], bool)):
            raise CheckpointError(f"{cfg_file}: key {k!r} must be {typ.__name__}, got {type(cfg_d[k]).__name__}")
    try:
        cfg = StaticConfig(**cfg_d)
    except TypeError as e:  # a required key missing
        raise CheckpointError(f"{cfg_file}: {e}") from None
    try:
        table = load_file(str(path / "model.safetensors"))["embeddings"]
    except FileNotFoundError:
        raise CheckpointError(f"{path / 'model.safetensors'}: missing") from None
    except KeyError:
        raise CheckpointError(f"{path / 'model.safetensors'}: no tensor 'embeddings'") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'model.safetensors'}: corrupt or truncated safetensors file ({e})") from None
    if table.shape != (cfg.vocab_size, cfg.hidden_size):
        raise CheckpointError(f"{path}: table {table.shape} does not match config ({cfg.vocab_size}, {cfg.hidden_size})")
    if not np.isfinite(table).all():
        raise CheckpointError(f"{path / 'model.safetensors'}: the table has non-finite (NaN or inf) values in "
                              f"{int((~np.isfinite(table)).any(1).sum())} rows")
    emb = StaticEmbedder(table, path / "tokenizer.json", cfg, name=path.name)
    emb.integrity = integrity
    mf = path / "student_manifest.json"
    emb.manifest = json.loads(mf.read_text()) if mf.exists() else {}
    emb.artifact_bytes = (path / "model.safetensors").stat().st_size
    return emb


# ------------------------------------------------------------------------------------ distil


@torch.no_grad()
def token_embeddings(teacher, *, batch_size: int = 1024, ids: np.ndarray | None = None,
                     progress: bool = False) -> np.ndarray:
    """(V, D): each vocabulary token through the teacher as ``[CLS] tok [SEP]``, mean-pooled; with ``ids``
    only those tokens, in that order (len(ids), D)."""
    tok = teacher.tokenizer.tok
    V = teacher.model.config.vocab_size
    vocab_size = tok.get_vocab_size()
    specials = [tok.token_to_id(t) for t in ("[CLS]", "[SEP]")]
    if None in specials:  # SentencePiece-style (<s>, </s>)
        specials = [tok.token_to_id(t) for t in ("<s>", "</s>")]
    cls_id, sep_id = specials if None not in specials else (None, None)
    ids_all = torch.arange(min(V, vocab_size)) if ids is None else torch.as_tensor(np.asarray(ids, dtype=np.int64))
    out = np.zeros((V if ids is None else len(ids_all), teacher.model.config.hidden_size), dtype=np.float32)
    model = teacher.model.eval()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(ids_all), desc="token table", unit="tok", disable=not progress)
    for s in range(0, len(ids_all), batch_size):
        mid = ids_all[s:s + batch_size, None]  # (B, 1)
        parts = ([torch.full_like(mid, cls_id)] if cls_id is not None else []) + [mid] + \
                ([torch.full_like(mid, sep_id)] if sep_id is not None else [])
        ids = torch.cat(parts, dim=1)  # (B, 3)
        out[s:s + len(mid)] = model.embed(ids, torch.ones_like(ids)).pooled.float().numpy()
        bar.update(len(mid))
    bar.close()
    return out


def pruned_tokenizer(tokenizer_json: dict, keep: np.ndarray) -> dict:
    """A SentencePiece Unigram ``tokenizer.json`` restricted to the token ids ``keep`` (sorted, the
    special tokens included), renumbered 0..len(keep)-1 in the old order.

    Text whose best segmentation uses only kept pieces (every text the ids were counted on) tokenises to
    the same pieces as before; other text is segmented with the kept pieces (Viterbi over what is left),
    a character no kept piece covers becomes ``<unk>``. Ids the special-token records name are remapped.
    Only Unigram vocabularies are pruned: a WordPiece's ``##`` continuations do not survive removal."""
    import copy

    model = tokenizer_json.get("model") or {}
    if model.get("type") != "Unigram":
        raise ValueError(f"vocabulary pruning needs a SentencePiece Unigram tokenizer, got {model.get('type')!r} "
                         "(use vocab 'all')")
    keep = np.asarray(keep, dtype=np.int64)
    new_id = {int(o): n for n, o in enumerate(keep)}
    d = copy.deepcopy(tokenizer_json)
    vocab = model["vocab"]
    d["model"]["vocab"] = [vocab[int(i)] for i in keep if i < len(vocab)]
    if model.get("unk_id") is not None:
        if model["unk_id"] not in new_id:
            raise ValueError("vocabulary pruning must keep the unknown token")
        d["model"]["unk_id"] = new_id[model["unk_id"]]

    def remap(i: int) -> int:
        if i not in new_id:
            raise ValueError(f"vocabulary pruning dropped special token id {i}")
        return new_id[i]

    for t in d.get("added_tokens") or []:
        t["id"] = remap(t["id"])
    for t in ((d.get("post_processor") or {}).get("special_tokens") or {}).values():
        t["ids"] = [remap(i) for i in t["ids"]]
    if d.get("padding"):
        d["padding"]["pad_id"] = remap(d["padding"]["pad_id"])
    return d


def special_ids(tokenizer_json: dict) -> set[int]:
    """Ids a tokenizer inserts or pads with: added tokens, template specials, padding, unk; plus the
    SentencePiece control pieces ``<s> <pad> </s> <unk> <mask>`` where the vocabulary has them."""
    out = {t["id"] for t in tokenizer_json.get("added_tokens") or []}
    for t in ((tokenizer_json.get("post_processor") or {}).get("special_tokens") or {}).values():
        out.update(t["ids"])
    if tokenizer_json.get("padding"):
        out.add(tokenizer_json["padding"]["pad_id"])
    model = tokenizer_json.get("model") or {}
    if model.get("unk_id") is not None:
        out.add(model["unk_id"])
    if model.get("type") == "Unigram":
        out.update(i for i, (piece, _) in enumerate(model["vocab"]) if piece in ("<s>", "<pad>", "</s>", "<unk>", "<mask>"))
    return out


def token_frequencies(tokenizer_file: str | Path, corpus: list[str], vocab_size: int) -> np.ndarray:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(tokenizer_file))
    tok.no_padding()
    tok.no_truncation()
    counts = np.zeros(vocab_size, dtype=np.float64)
    for s in range(0, len(corpus), 1024):
        for e in tok.encode_batch(corpus[s:s + 1024]):
            np.add.at(counts, np.asarray(e.ids, dtype=np.int64), 1)
    return counts


def _temp_file(text: str, name: str) -> Path:
    """A file in a private temp folder removed at exit (the pruned tokenizer until ``save`` copies it)."""
    import atexit
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="moe2edge-static-"))
    atexit.register(shutil.rmtree, folder, True)
    (folder / name).write_text(text, encoding="utf-8")
    return folder / name


def pca(x: np.ndarray, dim: int) -> np.ndarray:
    """Center and project onto the top ``dim`` principal components (ordered by variance)."""
    xc = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(xc.astype(np.float64), full_matrices=False)  # vt (D, D)
    return (xc @ vt[:dim].T).astype(np.float32)


VOCABS = ("all", "corpus")


def distill_static(teacher, *, dim: int | None = 256, weighting: str = "sif", corpus: list[str] | None = None,
                   sif_coefficient: float = 1e-3, batch_size: int = 1024, vocab: str = "all",
                   progress: bool = False) -> StaticEmbedder:
    """Build a StaticEmbedder from a teacher Embedder (training-free; fine-tune with ``distill``).

    ``vocab="corpus"`` keeps only the rows the ``corpus`` (plus the teacher's prompt prefixes) uses, with
    the SentencePiece tokenizer pruned to match (``pruned_tokenizer``): a 250k-row XLM-R vocabulary costs
    250k teacher passes and a 250k-row table, while 17 languages of Debian text use ~23k rows per 2,000
    pairs. Only those tokens go through the teacher; the table and its tokenizer shrink alike."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if vocab not in VOCABS:
        raise ValueError(f"unknown vocab {vocab!r}; choose one of {', '.join(VOCABS)}")
    if vocab == "corpus" and not corpus:
        raise ValueError("vocab='corpus' needs a corpus of texts to choose the rows")
    D = teacher.model.config.hidden_size
    if dim is not None and not 1 <= dim <= D:
        raise ValueError(f"dim={dim} must be in [1, {D}] (the teacher's hidden size); None keeps {D} without PCA")
    if weighting == "sif" and not corpus:
        raise ValueError("weighting='sif' needs a corpus of texts to count token frequencies")
    tok_file = Path(teacher.tokenizer.dir) / "tokenizer.json"
    keep = None
    if vocab == "corpus":
        tok_json = json.loads(tok_file.read_text(encoding="utf-8"))
        prefixes = [p for p in dict(teacher.model.config.prompts).values() if p]
        used = token_frequencies(tok_file, list(corpus) + prefixes, teacher.model.config.vocab_size) > 0
        keep = np.union1d(np.flatnonzero(used), sorted(special_ids(tok_json)))  # sorted old ids
        tok_file = _temp_file(json.dumps(pruned_tokenizer(tok_json, keep), ensure_ascii=False), "tokenizer.json")
        log.info("static vocabulary: %d of %d rows used by the corpus", len(keep), teacher.model.config.vocab_size)
    table = token_embeddings(teacher, batch_size=batch_size, ids=keep, progress=progress)  # (V, D)
    if dim is not None and dim < D:
        table = pca(table, dim)  # (V, d)
    V = table.shape[0]
    if weighting == "zipf":
        p = 1.0 / np.arange(1, V + 1)  # model2vec: vocabulary assumed sorted by frequency
        w = sif_coefficient / (sif_coefficient + p / p.sum())
        table = table * w[:, None].astype(np.float32)
    elif weighting == "sif":
        counts = token_frequencies(tok_file, corpus, V)
        p = (counts + 1.0) / (counts.sum() + V)  # add-one smoothing: unseen tokens get the largest weight
        w = sif_coefficient / (sif_coefficient + p)
        table = table * w[:, None].astype(np.float32)
    cfg = StaticConfig(vocab_size=V, hidden_size=table.shape[1], pad_token_id=teacher.model.config.pad_token_id,
                       max_seq_length=teacher.model.config.max_seq_length,
                       matryoshka_dims=tuple(dict.fromkeys(d for d in (table.shape[1], 128) if d <= table.shape[1])),
                       prompts=dict(teacher.model.config.prompts))
    log.info("static table %s (weighting=%s)", table.shape, weighting)
    return StaticEmbedder(table, tok_file, cfg)
