"""A dense student as a standard transformers + sentence-transformers folder: no custom code.

    write_hf_folder(model, tokenizer_dir="runs/students/dense", out_dir="runs/hf/dense", verify_texts=texts)
    SentenceTransformer("runs/hf/dense")                    # Transformer -> Pooling(mean) -> Normalize
    transformers.AutoModel.from_pretrained("runs/hf/dense")   # BertModel, no trust_remote_code

Why ``BertModel`` computes exactly our dense learned-position model (teacher/model.py):

* embeddings: ``word[ids] + token_type[0] + position[0..S-1]`` then LayerNorm. BERT adds
  ``token_type[token_type_ids]`` (all zeros for one sequence, or its zero buffer when none are passed)
  and ``position[arange(S)]``: the same rows. multilingual-e5-small is such a BertModel with the XLM-R
  SentencePiece vocabulary, so the XLM-R case is this class too (RoBERTa's positions would start at
  pad_id + 1 instead).
* post-LN blocks: ``norm1(x + out_proj(attn))``, ``norm2(h + fc2(gelu(fc1(h))))`` with exact (erf) GELU
  = BERT's ``attention.output.LayerNorm`` / ``output.LayerNorm`` and ``hidden_act: "gelu"``; the fused
  ``Wqkv`` rows are ``[Wq; Wk; Wv]`` with heads contiguous = BERT's query / key / value; the same
  LayerNorm eps, scale 1/sqrt(head dim) and key-padding mask.
* sentence-transformers does the rest: masked mean over all real tokens (prompt included), L2 norm,
  ``max_seq_length`` truncation, the prompts from ``config_sentence_transformers.json``.

Refused (``HFExportError``), because no standard class computes it: MoE layers; rotary positions —
transformers' own ``nomic_bert`` class (>= 5) is Nomic Embed *v1.5*'s layer (bias-free q/k/v/o
projections, a gated SiLU MLP), while ours has biases everywhere and a non-gated exact-GELU MLP (the
check is a test: tests/test_hf_export.py). BERT's pooler (unused by mean pooling) is written as zeros
so that loading reports no randomly initialised weights and ``pooler_output`` is deterministic.

Every folder is verified before it appears (optimum-style): AutoTokenizer gives our token ids and
AutoModel + mean pooling our embeddings within ``atol`` on real text, else nothing is written.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from moe2edge._io import atomic_dir

log = logging.getLogger(__name__)

FORMAT = "moe2edge.hf-export/v1"
MANIFEST = "moe2edge_export.json"
DEFAULT_ATOL = 1e-5
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "sentencepiece.bpe.model")


class HFExportError(ValueError):
    """The model cannot be written as a standard folder, or the written folder does not match it."""


def check_exportable(model: nn.Module) -> None:
    """Raise ``HFExportError`` naming what a standard BertModel cannot express."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "position_embedding"):
        raise HFExportError(f"{type(model).__name__} is not a transformer of this project (a static student is a "
                            "token table: use moe2edge.student.load_student or `moe2edge compile` for it)")
    moe = list(cfg.moe_layers)
    if moe:
        raise HFExportError(
            f"MoE layers at {moe} ({cfg.num_experts} experts, top-{cfg.moe_top_k}): no standard transformers class "
            "routes experts. Distil a dense student first (`moe2edge distill --student dense`), or use "
            "`moe2edge compile --st-out` for sentence-transformers' OpenVINO backend")
    if cfg.position_embedding != "learned":
        raise HFExportError(
            "rotary positions: transformers' own nomic_bert class is Nomic Embed v1.5's layer (no biases on "
            "q/k/v/out, gated SiLU MLP) and cannot hold this model's biased, non-gated exact-GELU layers; only "
            "learned-position (BERT-family) students export to a standard folder")


def bert_config(cfg) -> dict:
    """BertConfig keys for a dense learned-position TeacherConfig."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",  # exact erf GELU in transformers (tanh would be "gelu_new")
        "hidden_dropout_prob": 0.1,  # BERT's training defaults; inference (eval mode) ignores them
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }


def bert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our tensor names -> BertModel's (the inverse of teacher.checkpoint's BERT import); Wqkv split."""
    cfg = model.config
    src = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    D = cfg.hidden_size
    out = {
        "embeddings.word_embeddings.weight": src["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": src["embeddings.position_embeddings.weight"],
        "embeddings.token_type_embeddings.weight": src["embeddings.token_type_embeddings.weight"],
        "embeddings.LayerNorm.weight": src["emb_ln.weight"],
        "embeddings.LayerNorm.bias": src["emb_ln.bias"],
    }
    for i in range(cfg.num_layers):
        p, q = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            wq, wk, wv = src[f"{p}attn.Wqkv.{kind}"].split(D, dim=0)  # rows [Wq; Wk; Wv]
            out[f"{q}attention.self.query.{kind}"] = wq
            out[f"{q}attention.self.key.{kind}"] = wk
            out[f"{q}attention.self.value.{kind}"] = wv
            for ours, theirs in (("attn.out_proj", "attention.output.dense"), ("norm1", "attention.output.LayerNorm"),
                                 ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"),
                                 ("norm2", "output.LayerNorm")):
                out[f"{q}{theirs}.{kind}"] = src[f"{p}{ours}.{kind}"]
    out["pooler.dense.weight"] = torch.zeros(D, D)  # unused by mean pooling (module docstring)
    out["pooler.dense.bias"] = torch.zeros(D)
    return {k: v.contiguous().clone() for k, v in out.items()}


def _special_tokens(tok_json: dict, pad_id: int) -> dict:
    """pad / unk / cls / sep / mask tokens named by a tokenizer.json (for a generated tokenizer_config.json)."""
    vocab = {t["content"]: t["id"] for t in tok_json.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()}
    out = {}
    if pad_id in by_id:
        out["pad_token"] = by_id[pad_id]
    model = tok_json.get("model", {})
    unk = model.get("unk_token")
    if unk is None and model.get("unk_id") is not None:
        unk = by_id.get(model["unk_id"]) or model.get("vocab", [[None]])[model["unk_id"]][0]
    if unk:
        out["unk_token"] = unk
    post = tok_json.get("post_processor") or {}
    if post.get("type") in ("RobertaProcessing", "BertProcessing"):
        out["cls_token"], out["sep_token"] = post["cls"][0], post["sep"][0]
    elif post.get("type") == "TemplateProcessing":
        single = [x["SpecialToken"]["id"] for x in post.get("single", []) if "SpecialToken" in x]
        if len(single) >= 1:
            out["cls_token"] = single[0]
        if len(single) >= 2:
            out["sep_token"] = single[-1]
    for m in ("<mask>", "[MASK]"):
        if m in vocab:
            out["mask_token"] = m
    return out


def _copy_tokenizer(tokenizer_dir: Path, tmp: Path, cfg) -> str:
    """Copy the tokenizer files; write a tokenizer_config.json when the source has none. -> how it was made."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise HFExportError(f"{tokenizer_dir}: no tokenizer.json to carry over")
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, tmp / name)
    if (tmp / "tokenizer_config.json").exists():
        return "copied"
    tok_json = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
    conf = {"tokenizer_class": "PreTrainedTokenizerFast",  # loads tokenizer.json as is (WordPiece or Unigram)
            "model_max_length": cfg.max_seq_length, "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
            **_special_tokens(tok_json, cfg.pad_token_id)}
    (tmp / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
    return "generated"


def _versions() -> dict:
    import importlib

    out = {"torch": torch.__version__}
    for mod in ("transformers", "sentence_transformers", "tokenizers"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except ImportError:
            pass
    return out


@torch.no_grad()
def verify_folder(model: nn.Module, folder: Path, texts: list[str], *, atol: float = DEFAULT_ATOL,
                  batch_size: int = 16) -> dict:
    """AutoTokenizer ids == ours and AutoModel + masked mean + L2 == our embeddings (max abs <= atol)."""
    from moe2edge._optional import require
    from moe2edge._text import Tokenizer

    transformers = require("transformers", extra="interop", purpose="verifying the standard folder")
    cfg = model.config
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # keep the CLI's output to its own lines
    try:
        hf_model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    ours = Tokenizer(folder / "tokenizer.json", max_length=cfg.max_seq_length, pad_id=cfg.pad_token_id)
    max_abs, id_mismatch = 0.0, 0
    for s in range(0, len(texts), batch_size):  # file order, not length-sorted: batches carry real padding
        batch = texts[s:s + batch_size]
        ids, mask, _ = ours(batch)
        enc = hf_tok(batch, padding=True, truncation=True, max_length=cfg.max_seq_length, return_tensors="np")
        if enc["input_ids"].shape != ids.shape or not np.array_equal(enc["input_ids"], ids) \
                or not np.array_equal(enc["attention_mask"], mask):
            id_mismatch += len(batch)
            continue
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        ref = model.embed(ids_t, mask_t).embeddings  # (B, D)
        hidden = hf_model(input_ids=ids_t, attention_mask=mask_t,
                          **({"token_type_ids": torch.from_numpy(enc["token_type_ids"])}
                             if "token_type_ids" in enc else {})).last_hidden_state  # (B, S, D)
        m = mask_t[..., None].to(hidden.dtype)
        got = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
        max_abs = max(max_abs, float((got - ref).abs().max()))
    if id_mismatch:
        raise HFExportError(f"AutoTokenizer of the written folder gives other token ids than the model's tokenizer "
                            f"on {id_mismatch} of {len(texts)} texts: tokenizer_config.json does not match")
    if max_abs > atol:
        raise HFExportError(f"AutoModel of the written folder differs from the model: max |embedding diff| "
                            f"{max_abs:.3g} > {atol:g} on {len(texts)} texts")
    return {"n": len(texts), "max_abs": max_abs, "atol": atol, "token_ids_equal": True}


def write_hf_folder(model: nn.Module, *, tokenizer_dir: str | Path, out_dir: str | Path,
                    verify_texts: list[str] | None, atol: float = DEFAULT_ATOL, source_hash: str | None = None,
                    force: bool = False) -> dict:
    """Write ``out_dir`` atomically as a BertModel + sentence-transformers folder; returns its manifest.

    ``verify_texts`` (real text) are embedded by the written folder through transformers and compared
    with ``model`` before the folder appears; ``None`` skips the check (recorded in the manifest).
    """
    from safetensors.torch import save_file

    from moe2edge.teacher.checkpoint import st_side_files  # the same ST side files as our own checkpoints

    check_exportable(model)
    model = model.eval()
    cfg = model.config
    out_dir = Path(out_dir)
    from moe2edge._integrity import write_files_manifest

    # Replaces only a folder this tool exported (else force), never the source (moe2edge._io.safe_output).
    with atomic_dir(out_dir, kinds=("hf-folder",), force=force, inputs=[tokenizer_dir]) as tmp:
        hf_cfg = bert_config(cfg)
        try:  # transformers 5 warns of a "Mistral regex" on local tokenizers whose config.json lacks a version
            import transformers

            hf_cfg["transformers_version"] = transformers.__version__
        except ImportError:
            pass
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        save_file(bert_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, obj in st_side_files(cfg).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        tok_conf = _copy_tokenizer(Path(tokenizer_dir), tmp, cfg)
        parity = verify_folder(model, tmp, verify_texts, atol=atol) if verify_texts else None
        manifest = {"format": FORMAT, "architecture": "BertModel", "source_checkpoint_hash": source_hash,
                    "tokenizer_config": tok_conf, "max_seq_length": cfg.max_seq_length, "prompts": dict(cfg.prompts),
                    "pooling": "mean", "normalize": True, "matryoshka_dims": list(cfg.matryoshka_dims),
                    "parity": parity, "versions": _versions()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        write_files_manifest(tmp, kind="hf-folder")  # size + sha256 of every file: a re-export may replace it
    log.info("wrote %s (BertModel, %d layers%s)", out_dir, cfg.num_layers,
             f", verified max-abs {parity['max_abs']:.1e}" if parity else ", not verified")
    return manifest
