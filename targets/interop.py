"""A sentence-transformers-loadable folder: ``SentenceTransformer(dir, backend="openvino" | "onnx")``.

What ST's backends need (measured with sentence-transformers 5.3.0, optimum 2.3.0, optimum-intel 2.1.0,
transformers 5.5.4): a folder with an ``AutoConfig``-loadable ``config.json``, the tokenizer files,
``modules.json`` (Transformer -> Pooling(mean) -> Normalize) and ``openvino/openvino_model.xml`` /
``onnx/model.onnx`` whose graph maps ``input_ids, attention_mask`` to ``last_hidden_state`` (B, S, H):
ST does the pooling itself, so this graph stops before pooling (unlike the engine graph). The PyTorch
model class is never built, so the MoE model works too: ``model_type: nomic_bert`` resolves to
transformers' own (dense) NomicBert *config*, which is all the OV backend reads.

Measured: backend="openvino" gives the PyTorch embeddings to 1e-7 for the MoE model and MiniLM.
backend="onnx" cannot load in this stack for ANY model: ST imports ``optimum.onnxruntime``, which
optimum 2.x moved to the separate ``optimum-onnx`` package, and that pins transformers < 4.58
(conflicts with transformers 5.5.4 / optimum-intel 2.1.0). The ``onnx/model.onnx`` written here is the
graph it would load.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from moe2edge._io import atomic_dir
from moe2edge.targets.torch_export import INPUT_NAMES, ExportEmbedder

log = logging.getLogger(__name__)

SIDE_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "sentencepiece.bpe.model", "1_Pooling/config.json", "2_Normalize")


class TokenEmbeddings(nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state (B, S, H), sparse MoE inside."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = ExportEmbedder(model).model

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids, attention_mask).last_hidden_state


def write_st_folder(model: nn.Module, checkpoint_dir: str | Path, out_dir: str | Path, sample, *,
                    force: bool = False) -> Path:
    """Write ``out_dir`` (atomically) with onnx/model.onnx, openvino/openvino_model.xml and the ST side files,
    all listed with size + sha256 in moe2edge_files.json; an existing ``out_dir`` is replaced only if it is
    such a folder written by this tool (else ``force``)."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not (checkpoint_dir / "modules.json").exists():
        raise FileNotFoundError(f"{checkpoint_dir}: no modules.json (a sentence-transformers layout is needed)")
    ids = torch.as_tensor(sample.input_ids)
    mask = torch.as_tensor(sample.attention_mask)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    from moe2edge._integrity import write_files_manifest

    with atomic_dir(out_dir, kinds=("sentence-transformers",), force=force) as tmp:
        for name in SIDE_FILES:
            src = checkpoint_dir / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.exists():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / name)
        (tmp / "onnx").mkdir()
        with torch.no_grad():
            prog = torch.onnx.export(TokenEmbeddings(model).eval(), (ids, mask), dynamo=True, input_names=INPUT_NAMES,
                                     output_names=["last_hidden_state"], dynamic_shapes={
                                         "input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
        prog.save(str(tmp / "onnx" / "model.onnx"))
        try:
            import openvino as ov
        except ImportError:
            log.warning("openvino not installed: wrote only onnx/model.onnx")
        else:
            (tmp / "openvino").mkdir()
            ov.save_model(ov.convert_model(str(tmp / "onnx" / "model.onnx")), str(tmp / "openvino" /
                                                                                   "openvino_model.xml"),
                          compress_to_fp16=False)
        write_files_manifest(tmp, kind="sentence-transformers")
    return out_dir
