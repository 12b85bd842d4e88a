"""Checkpoint I/O in the released Hugging Face folder format (spec section 2).

A folder holds ``config.json`` (GPT-2-style keys, ``model_type: nomic_bert``), ``model.safetensors``
(float32, exact tensor names, no prefix; sharded ``model.safetensors.index.json`` also read), the
sentence-transformers side files (``modules.json``, ``1_Pooling/config.json``,
``sentence_bert_config.json``, ``config_sentence_transformers.json`` with the prompts) and the
tokenizer files. HF BERT checkpoints (``model_type: bert``, e.g. all-MiniLM-L6-v2) load as a dense
model of the same family (learned positions). Every mismatch raises :class:`CheckpointError` naming
the file, key or tensor.

A folder written here also lists its files with size and sha256 (``moe2edge_files.json``, named in
``config.json``'s ``moe2edge.files``); ``load_pretrained`` compares them before reading anything and
refuses a mismatch (``moe2edge._integrity``). A folder without that list (a released checkpoint)
loads as before. Non-finite weights are refused at load, naming the tensors.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from moe2edge._integrity import FILES_MANIFEST, check_folder, write_files_manifest
from moe2edge._io import atomic_dir, sha256_file
from moe2edge.errors import UserError
from moe2edge.teacher.model import NOMIC_PROMPTS, NomicMoE, TeacherConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model", "vocab.txt",
)
# The released config's remote-code pointers: kept so a saved folder looks like the release.
NOMIC_AUTO_MAP = {
    "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
    "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
}


class CheckpointError(UserError, ValueError):
    """A checkpoint folder is missing, corrupt or does not match its config."""


# --------------------------------------------------------------------------------------------
# config.json <-> TeacherConfig
# --------------------------------------------------------------------------------------------


def config_to_hf(cfg: TeacherConfig) -> dict:
    rotary = cfg.position_embedding == "rotary"
    d = {
        "architectures": ["NomicBertModel"],
        "auto_map": NOMIC_AUTO_MAP,
        "model_type": "nomic_bert",
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "activation_function": "gelu",
        "rotary_emb_fraction": 1.0 if rotary else 0.0,
        "rotary_emb_base": cfg.rotary_base,
        "rotary_emb_interleaved": False,
        "n_positions": 2048 if rotary else cfg.max_position_embeddings,
        "max_trained_positions": 2048 if rotary else cfg.max_position_embeddings,
        "prenorm": False,
        "qkv_proj_bias": True,
        "mlp_fc1_bias": True,
        "mlp_fc2_bias": True,
        "causal": False,
        "moe_every_n_layers": cfg.moe_every_n_layers,
        "num_experts": cfg.num_experts,
        "moe_top_k": cfg.moe_top_k,
        "moe_normalize_expert_weights": cfg.moe_normalize_expert_weights,
        "num_shared_experts": 0,
        "ffn_div": 1,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
        # Our own keys (ignored by other loaders): what the HF keys cannot say.
        "moe2edge": {
            "format_version": FORMAT_VERSION,
            "matryoshka_dims": list(cfg.matryoshka_dims),
            "moe_expert_fc1_bias": cfg.moe_expert_fc1_bias,
            "files": FILES_MANIFEST,  # this folder lists its files' sizes and sha256 there (checked at load)
        },
    }
    return d


# Values of HF keys this implementation does not compute; anything else would load silently wrong.
_REQUIRED_VALUES = {
    "prenorm": False, "rotary_emb_interleaved": False, "qkv_proj_bias": True, "mlp_fc1_bias": True,
    "mlp_fc2_bias": True, "num_shared_experts": 0, "ffn_div": 1, "causal": False,
}


def _require_key(d: dict, key: str, where: str):
    if key not in d:
        raise CheckpointError(f"{where}: missing required key {key!r}")
    return d[key]


def _typed(d: dict, key: str, typ, where: str, default=None, *, required: bool = False):
    """``d[key]`` as ``typ`` (int / float / bool), or a CheckpointError naming the key and the value."""
    if key not in d or d[key] is None:
        if required:
            raise CheckpointError(f"{where}: missing required key {key!r}")
        return default
    v = d[key]
    ok = (isinstance(v, bool) if typ is bool else
          isinstance(v, int) and not isinstance(v, bool) if typ is int else
          isinstance(v, (int, float)) and not isinstance(v, bool))
    if typ is int and isinstance(v, float) and v.is_integer():
        ok, v = True, int(v)
    if not ok:
        raise CheckpointError(f"{where}: key {key!r} must be {'a number' if typ is float else typ.__name__}, got "
                              f"{type(v).__name__} {v!r}")
    return typ(v)


def config_from_hf(d: dict, *, where: str = "config.json", max_seq_length: int = 512, prompts=None) -> TeacherConfig:
    """Build a TeacherConfig from a nomic_bert config.json dict (released keys)."""
    if d.get("model_type") != "nomic_bert":
        raise CheckpointError(f"{where}: model_type is {d.get('model_type')!r}, expected 'nomic_bert' (or 'bert')")
    for k, v in _REQUIRED_VALUES.items():
        if k in d and d[k] != v:
            raise CheckpointError(f"{where}: {k}={d[k]!r} is not supported (this model family needs {v!r})")
    act = d.get("activation_function", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{where}: activation_function={act!r} is not supported (exact 'gelu' only)")
    frac = d.get("rotary_emb_fraction", 0.0)
    if isinstance(frac, bool) or frac not in (0.0, 1.0):
        raise CheckpointError(f"{where}: rotary_emb_fraction={frac!r} is not supported (1.0 rotary or 0.0 learned)")
    hidden = _typed(d, "n_embd", int, where, required=True)
    ours = d.get("moe2edge", {})
    if not isinstance(ours, dict):
        raise CheckpointError(f"{where}: key 'moe2edge' must be an object, got {type(ours).__name__}")
    dims = ours.get("matryoshka_dims") or ([hidden, 256] if hidden > 256 else [hidden])
    if not isinstance(dims, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in dims):
        raise CheckpointError(f"{where}: key 'moe2edge.matryoshka_dims' must be a list of positive integers, got {dims!r}")
    for key in ("n_embd", "vocab_size", "n_layer", "n_head"):
        if _typed(d, key, int, where, required=True) < 1:
            raise CheckpointError(f"{where}: key {key!r} must be >= 1, got {d[key]}")
    try:
        return TeacherConfig(
            vocab_size=_typed(d, "vocab_size", int, where, required=True),
            hidden_size=hidden,
            num_layers=_typed(d, "n_layer", int, where, required=True),
            num_heads=_typed(d, "n_head", int, where, required=True),
            intermediate_size=_typed(d, "n_inner", int, where) or 4 * hidden,
            type_vocab_size=_typed(d, "type_vocab_size", int, where, 1),
            layer_norm_eps=_typed(d, "layer_norm_epsilon", float, where, 1e-5),
            position_embedding="rotary" if frac == 1.0 else "learned",
            max_position_embeddings=0 if frac == 1.0 else _typed(d, "n_positions", int, where, required=True),
            rotary_base=_typed(d, "rotary_emb_base", float, where, 10000.0),
            moe_every_n_layers=_typed(d, "moe_every_n_layers", int, where, 0),
            num_experts=_typed(d, "num_experts", int, where, 0),
            moe_top_k=_typed(d, "moe_top_k", int, where, 1),
            moe_normalize_expert_weights=_typed(d, "moe_normalize_expert_weights", bool, where, False),
            router_aux_loss_coef=_typed(d, "router_aux_loss_coef", float, where, 0.1),
            moe_expert_fc1_bias=_typed(ours, "moe_expert_fc1_bias", bool, where + " moe2edge", False),
            pad_token_id=_typed(d, "pad_token_id", int, where, 1),
            max_seq_length=max_seq_length,
            matryoshka_dims=tuple(dims),
            prompts=dict(NOMIC_PROMPTS) if prompts is None else dict(prompts),
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: inconsistent config: {e}") from e


def _read_json(path: Path) -> dict:
    from moe2edge._io import read_json_file

    try:
        return read_json_file(path, "checkpoint file", expect=dict)
    except (OSError, ValueError) as e:  # the same message, as a checkpoint error
        raise CheckpointError(str(e)) from None


def _st_side_info(path: Path, default_prompts):
    """max_seq_length and prompts from the sentence-transformers side files, if present."""
    max_len, prompts = 512, default_prompts
    sb = path / "sentence_bert_config.json"
    if sb.exists():
        max_len = _typed(_read_json(sb), "max_seq_length", int, str(sb), max_len)
        if max_len < 1:
            raise CheckpointError(f"{sb}: key 'max_seq_length' must be >= 1, got {max_len}")
    cst = path / "config_sentence_transformers.json"
    if cst.exists():
        prompts = _read_json(cst).get("prompts", {}) or {}
        if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
            raise CheckpointError(f"{cst}: key 'prompts' must map prompt names to prefix strings")
    return max_len, prompts


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` (or the shards named by its index)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    files = [single] if single.exists() else []
    if not files and index.exists():
        files = sorted({path / f for f in _read_json(index).get("weight_map", {}).values()})
    if not files:
        raise CheckpointError(f"{path}: no model.safetensors (or model.safetensors.index.json) found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except FileNotFoundError:
            raise CheckpointError(f"{f}: shard named in the index is missing") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from e
    return state


def load_state_into(model: NomicMoE, state: dict[str, torch.Tensor], *, where: str) -> NomicMoE:
    """Strictly check names and shapes, naming every offending tensor, then load (assign)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""))
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:10]))
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match its config: " + " | ".join(problems))
    bad = [k for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"{where}: non-float tensors: {', '.join(bad[:5])}")
    # A NaN / inf weight makes every embedding NaN (an all-NaN .npy, rc 0, before this check).
    nonfinite = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(f"{where}: non-finite (NaN or inf) weights in {len(nonfinite)} tensor(s): "
                              f"{', '.join(nonfinite[:5])}; the checkpoint is corrupt or training diverged")
    model.load_state_dict({k: _aligned_fp32(v) for k, v in state.items()}, strict=True, assign=True)
    return model


def _aligned_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32, 64-byte aligned. safetensors hands out views at arbitrary offsets of the file buffer, and
    CPU kernels pick their SIMD path by alignment: the same weights behind a header of another length
    gave embeddings 1.5e-8 apart (measured). A fresh allocation makes the result depend on the values only."""
    t = t.to(torch.float32)
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _bert_to_nomic(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """HF BertModel tensor names -> our (released nomic_bert) names; Q, K, V fused into Wqkv."""
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    out = {}
    rename = {
        "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight": "emb_ln.weight",
        "embeddings.LayerNorm.bias": "emb_ln.bias",
    }
    for src, dst in rename.items():
        if src in state:
            out[dst] = state[src]
    for i in range(num_layers):
        p, q = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            parts = [state.get(f"{p}attention.self.{n}.{kind}") for n in ("query", "key", "value")]
            if all(t is not None for t in parts):
                out[f"{q}attn.Wqkv.{kind}"] = torch.cat(parts, dim=0)  # rows [Wq; Wk; Wv]
            for src, dst in (
                ("attention.output.dense", "attn.out_proj"),
                ("attention.output.LayerNorm", "norm1"),
                ("intermediate.dense", "mlp.fc1"),
                ("output.dense", "mlp.fc2"),
                ("output.LayerNorm", "norm2"),
            ):
                if f"{p}{src}.{kind}" in state:
                    out[f"{q}{dst}.{kind}"] = state[f"{p}{src}.{kind}"]
    return out


def bert_config(d: dict, *, where: str, max_seq_length: int, prompts) -> TeacherConfig:
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{where}: position_embedding_type={d['position_embedding_type']!r} is not supported")
    if d.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}: hidden_act={d['hidden_act']!r} is not supported (exact 'gelu' only)")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if _typed(d, key, int, where, required=True) < 1:
            raise CheckpointError(f"{where}: key {key!r} must be >= 1, got {d[key]}")
    try:
        return TeacherConfig(
            vocab_size=_typed(d, "vocab_size", int, where, required=True),
            hidden_size=_typed(d, "hidden_size", int, where, required=True),
            num_layers=_typed(d, "num_hidden_layers", int, where, required=True),
            num_heads=_typed(d, "num_attention_heads", int, where, required=True),
            intermediate_size=_typed(d, "intermediate_size", int, where, required=True),
            type_vocab_size=_typed(d, "type_vocab_size", int, where, 2),
            layer_norm_eps=_typed(d, "layer_norm_eps", float, where, 1e-12),
            position_embedding="learned",
            max_position_embeddings=_typed(d, "max_position_embeddings", int, where, 512),
            moe_every_n_layers=0,
            num_experts=0,
            pad_token_id=_typed(d, "pad_token_id", int, where, 0),
            max_seq_length=max_seq_length,
            matryoshka_dims=(d["hidden_size"],),
            prompts=prompts,
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: inconsistent config: {e}") from None


def load_pretrained(path: str | Path, *, check: bool | None = None) -> NomicMoE:
    """Load a nomic_bert folder (released format, dense or MoE) or an HF BERT folder as a NomicMoE.

    Files are first compared with the folder's size / sha256 list when it has one (``check=False`` skips
    that; default: on unless ``MOE2EDGE_SKIP_INTEGRITY_CHECK`` is set). The report is ``model.integrity``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: {'is a file, not' if path.exists() else 'no such'} checkpoint folder")
    hf = _read_json(path / "config.json")
    ours = hf.get("moe2edge")
    integrity = check_folder(path, check=check, required=isinstance(ours, dict) and "files" in ours)
    mtype = hf.get("model_type")
    if mtype == "bert":
        max_len, prompts = _st_side_info(path, {})
        cfg = bert_config(hf, where=str(path / "config.json"), max_seq_length=max_len, prompts=prompts)
        state = _bert_to_nomic(read_safetensors(path), cfg.num_layers)
    elif mtype == "nomic_bert":
        max_len, prompts = _st_side_info(path, NOMIC_PROMPTS)
        cfg = config_from_hf(hf, where=str(path / "config.json"), max_seq_length=max_len, prompts=prompts)
        state = read_safetensors(path)
    else:
        raise CheckpointError(f"{path / 'config.json'}: unsupported model_type {mtype!r} (nomic_bert or bert)")
    with torch.device("meta"):
        model = NomicMoE(cfg)
    load_state_into(model, state, where=str(path))
    model.integrity = integrity
    log.info("loaded %s (%s, %.1fM params)", path, mtype, model.num_parameters() / 1e6)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def st_side_files(cfg: TeacherConfig) -> dict[str, dict | list]:
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "1_Pooling/config.json": {
            "word_embedding_dimension": cfg.hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
        "sentence_bert_config.json": {"max_seq_length": cfg.max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "prompts": dict(cfg.prompts),
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
            "model_type": "SentenceTransformer",
        },
    }


def save_pretrained(model: NomicMoE, path: str | Path, *, tokenizer_dir: str | Path | None = None,
                    extra_files: dict[str, dict] | None = None, before_commit=None, kind: str = "checkpoint",
                    force: bool = False) -> Path:
    """Write the folder atomically: it appears complete or not at all (an old one stays on error).

    ``before_commit(tmp_dir)`` may add files (e.g. trainer state) that must land in the same rename. Every
    file is listed with its size and sha256 in ``moe2edge_files.json`` (``kind``: "checkpoint" | "student").
    An existing ``path`` is replaced only if it is a folder of that kind written by this tool and holds
    nothing else, unless ``force`` (``moe2edge._io.safe_output``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    cfg = model.config
    with atomic_dir(path, kinds=(kind,), force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, obj in {**st_side_files(cfg), **(extra_files or {})}.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).exists():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
            if not (tmp / "tokenizer.json").exists():
                raise CheckpointError(f"{tokenizer_dir}: no tokenizer.json to copy")
        if before_commit is not None:
            before_commit(tmp)
        write_files_manifest(tmp, kind=kind)
    log.info("saved %s", path)
    return path


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over config.json and the weights: the identity recorded in lineage manifests."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(path.glob("model*.safetensors")) + [path / "config.json"]:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
