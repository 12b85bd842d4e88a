"""Edge runtime: run a compiled engine folder with only its runtime + ``tokenizers`` + numpy (no torch).

    from moe2edge.targets.runtime import load_engine
    emb = load_engine("engines/minilm-moe-int8")
    q = emb.encode(["how to find files"], prompt="search_query")   # (N, D) float32, unit rows

An engine folder is self-contained: ``engine.json`` (what to run and how: model file, runtime,
input/output names, output dim, max length, pad id, prompts, OpenVINO precision hint),
``tokenizer.json``, the model file(s) and ``manifest.json`` (provenance + measured parity).
``encode`` has the signature of ``moe2edge.teacher.Embedder.encode``. Nothing here imports torch or
``moe2edge.teacher`` (tested in a venv without torch).

Dimension legend: B batch, S sequence, D output dim.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from moe2edge._io import tree_bytes
from moe2edge._text import Tokenizer, check_encode_args, check_texts  # noqa: F401 (Tokenizer: re-exported)
from moe2edge.errors import UserError

log = logging.getLogger(__name__)

ENGINE_FORMAT = "moe2edge.engine/v1"
ENGINE_FILE = "engine.json"
# Same cut as the teacher's tokenizer: a token is rarely shorter than one character, so cutting the
# raw text at 32 characters per allowed token changes nothing that survives truncation.


class EngineFolderError(UserError, ValueError):
    """An engine folder is missing files or was written by an incompatible version."""


# ------------------------------------------------------------------------------------ engines


class OrtEngine:
    """ONNX Runtime CPU session (also runs TensorRT's QDQ ONNX for CPU verification)."""

    def __init__(self, path: str | Path, *, threads: int = 1, output_name: str = "sentence_embedding"):
        from moe2edge._optional import require

        ort = require("onnxruntime", extra="runtime", purpose="running ONNX engines")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        self.path, self.threads, self.output_name = Path(path), threads, output_name
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own classes (InvalidProtobuf, Fail, ...) for bad files
            raise EngineFolderError(f"{path}: ONNX Runtime cannot load this model ({type(e).__name__}: "
                                    f"{' '.join(str(e).split())[:200]}); the file is corrupt or truncated, rebuild the "
                                    "engine with `moe2edge compile`") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, input_ids, attention_mask) -> np.ndarray:
        feeds = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64)}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        return self.session.run([self.output_name], feeds)[0]


class OpenVinoEngine:
    """OpenVINO CPU compiled model; the inference precision is pinned explicitly (CPU default: bf16
    on this AVX-512-BF16 machine, which costs ~1e-3 cosine; f32 is what parity is verified with)."""

    def __init__(self, path: str | Path, *, threads: int = 1, precision_hint: str = "f32",
                 output_name: str = "sentence_embedding"):
        from moe2edge._optional import require

        ov = require("openvino", extra="openvino", purpose="running OpenVINO engines")
        core = ov.Core()
        self.path, self.threads, self.precision_hint = Path(path), threads, precision_hint
        cfg = {"INFERENCE_PRECISION_HINT": precision_hint, "INFERENCE_NUM_THREADS": threads,
               "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError for any unreadable model
            raise EngineFolderError(f"{path}: OpenVINO cannot load this model ({' '.join(str(e).split())[:200]}); the "
                                    "file is corrupt or truncated, rebuild the engine with `moe2edge compile`") from None
        self.request = self.compiled.create_infer_request()
        self.output_name = output_name
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]

    def run(self, input_ids, attention_mask) -> np.ndarray:
        feeds = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64)}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        res = self.request.infer(feeds)
        return np.array(res[self.compiled.output(self.output_name)], dtype=np.float32, copy=True)


class TensorRTEngine:
    """A serialized TensorRT engine (engine.plan) on a CUDA GPU. Needs ``tensorrt`` and torch (CUDA) for
    device buffers, imported lazily. Not runnable on this project's CPU machines."""

    def __init__(self, path: str | Path, *, output_name: str = "sentence_embedding", **_):
        from moe2edge._optional import require

        trt = require("tensorrt", extra=None, purpose="running TensorRT engines (needs a CUDA GPU)",
                      hint="install NVIDIA TensorRT >= 10 for your CUDA version (not a moe2edge extra)")
        import torch  # noqa: PLC0415 - only for CUDA buffers, only on a GPU machine

        if not torch.cuda.is_available():
            raise ImportError("TensorRT engines need a CUDA GPU; none is visible")
        self.torch, self.output_name = torch, output_name
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        self.context = self.engine.create_execution_context()

    def run(self, input_ids, attention_mask) -> np.ndarray:
        torch = self.torch
        ids = torch.as_tensor(np.asarray(input_ids, np.int64), device="cuda")
        mask = torch.as_tensor(np.asarray(attention_mask, np.int64), device="cuda")
        for name, t in (("input_ids", ids), ("attention_mask", mask)):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), device="cuda", dtype=torch.float32)
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out.cpu().numpy()


RUNTIMES = {"onnxruntime": OrtEngine, "openvino": OpenVinoEngine, "tensorrt": TensorRTEngine}


def open_runtime(runtime: str, path: str | Path, *, threads: int = 1, **kw):
    if runtime not in RUNTIMES:
        raise EngineFolderError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    return RUNTIMES[runtime](path, threads=threads, **kw)


# ------------------------------------------------------------------------------------ embedder

# engine.json: key -> (type, required); checked so that a hand-edited file fails naming the key, not deep
# inside numpy or a runtime.
_SPEC_KEYS = {"format": (str, True), "model_file": (str, True), "runtime": (str, True), "dim": (int, True),
              "max_seq_length": (int, True), "pad_token_id": (int, True), "prompts": (dict, False),
              "tokenizer": (str, False), "output_name": (str, False), "ov_precision_hint": (str, False),
              "plan_file": (str, False), "name": (str, False), "vocab_size": (int, False),
              "shape_buckets": (int, False), "model_data_file": (str, False)}

# Sequence-length bucketing: pad each batch's length up to a multiple of this many tokens (pad id, mask 0:
# exact, the mask hides the padding from attention and pooling; tested). OpenVINO's CPU plugin prepares
# kernels for every new input shape, so a user's varying text paid ~2.5x per call on first sight of a
# length (docs/benchmarks.md, "Per-new-shape cost"); ONNX Runtime showed no per-shape cost, so it runs
# the exact length. engine.json's "shape_buckets" overrides the default; 0 = off.
DEFAULT_SHAPE_BUCKETS = {"openvino": 16, "onnxruntime": 0, "tensorrt": 0}


def _read_spec(spec_file: Path) -> dict:
    from moe2edge._io import read_json_file

    try:
        spec = read_json_file(spec_file, "engine spec", expect=dict)
    except (OSError, ValueError) as e:  # names the file and the line
        raise EngineFolderError(str(e)) from None
    if spec.get("format") != ENGINE_FORMAT:
        raise EngineFolderError(f"{spec_file}: format {spec.get('format')!r}, expected {ENGINE_FORMAT!r}")
    for key, (typ, required) in _SPEC_KEYS.items():
        if key not in spec or (spec[key] is None and not required):
            if required:
                raise EngineFolderError(f"{spec_file}: missing key {key!r}")
            continue
        v = spec[key]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise EngineFolderError(f"{spec_file}: key {key!r} must be {typ.__name__}, got {type(v).__name__} ({v!r})")
    for key, lo in (("dim", 1), ("max_seq_length", 1), ("pad_token_id", 0), ("vocab_size", 1), ("shape_buckets", 0)):
        if key in spec and spec[key] is not None and spec[key] < lo:
            raise EngineFolderError(f"{spec_file}: key {key!r} must be >= {lo}, got {spec[key]}")
    for key in ("model_file", "model_data_file"):
        rel = Path(spec.get(key) or ".")
        if rel.is_absolute() or ".." in rel.parts:
            raise EngineFolderError(f"{spec_file}: {key} {spec[key]!r} must be a path inside the folder")
    if spec["runtime"] not in RUNTIMES:
        raise EngineFolderError(f"{spec_file}: unknown runtime {spec['runtime']!r}; known: {', '.join(RUNTIMES)}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in (spec.get("prompts") or {}).items()):
        raise EngineFolderError(f"{spec_file}: key 'prompts' must map names to prefix strings")
    return spec



class EngineEmbedder:
    """Tokenizer + engine + prompts: the ``encode`` API of the teacher, for a compiled engine."""

    def __init__(self, folder: str | Path, *, threads: int = 1, check: bool | None = None,
                 shape_buckets: int | None = None):
        from moe2edge._integrity import check_folder

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EngineFolderError(f"{self.folder}: {'is a file, not' if self.folder.exists() else 'no such'} engine "
                                    "folder; build one with `moe2edge compile`")
        spec_file = self.folder / ENGINE_FILE
        if not spec_file.exists():
            raise EngineFolderError(f"{self.folder}: not an engine folder (no {ENGINE_FILE}); build one with "
                                    "`moe2edge compile`")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        # Sizes + sha256 of every file against manifest.json, before any of them is parsed or run.
        self.integrity = check_folder(self.folder, check=check, required=True)
        self.spec = spec = _read_spec(spec_file)
        model_file = self.folder / spec["model_file"]
        if not model_file.is_file():
            raise EngineFolderError(f"{model_file}: model file named in {ENGINE_FILE} is missing")
        data_file = self.folder / spec["model_data_file"] if spec.get("model_data_file") else None
        if data_file is not None and not data_file.is_file():  # the graph's weights (external data, > 1 GB models)
            raise EngineFolderError(f"{data_file}: the model's weight file named in {ENGINE_FILE} is missing; copy the "
                                    "whole engine folder, or rebuild it with `moe2edge compile`")
        self.name = spec.get("name") or self.folder.name
        self.dim = spec["dim"]
        self.prompts = dict(spec.get("prompts") or {})
        self.tokenizer = Tokenizer(self.folder / spec.get("tokenizer", "tokenizer.json"),
                                   max_length=spec["max_seq_length"], pad_id=spec["pad_token_id"])
        if spec.get("vocab_size") is not None:
            self.tokenizer.check_fits(spec["vocab_size"])
        self._threads = threads
        if shape_buckets is None:
            shape_buckets = spec.get("shape_buckets", DEFAULT_SHAPE_BUCKETS.get(spec["runtime"], 0))
        if isinstance(shape_buckets, bool) or not isinstance(shape_buckets, int) or shape_buckets < 0:
            raise ValueError(f"shape_buckets must be an integer >= 0, got {shape_buckets!r}")
        self.shape_buckets = shape_buckets
        self.engine = self._open(threads)
        self.artifact_bytes = tree_bytes(self.folder)

    def _open(self, threads: int):
        kw = {"output_name": self.spec.get("output_name", "sentence_embedding")}
        if self.spec["runtime"] == "openvino":
            kw["precision_hint"] = self.spec.get("ov_precision_hint", "f32")
        runtime = self.spec["runtime"]
        if runtime == "tensorrt":
            plan = self.folder / self.spec.get("plan_file", "engine.plan")
            from moe2edge._optional import has

            if plan.exists() and has("tensorrt"):
                from moe2edge.targets.plan_check import check_plan_record

                check_plan_record(self.folder, plan)  # refuses a plan without a passing record (how to rebuild)
                return TensorRTEngine(plan, **kw)
            # The QDQ ONNX is the verified CPU stand-in until build_engine.sh has run on a GPU machine.
            log.warning("%s: no TensorRT engine (%s) or no tensorrt here: running the QDQ ONNX with ONNX Runtime "
                        "on CPU", self.folder, plan.name)
            runtime = "onnxruntime"
        return open_runtime(runtime, self.folder / self.spec["model_file"], threads=threads, **kw)

    def set_num_threads(self, n: int) -> None:
        if n != self._threads:
            self.engine, self._threads = self._open(n), n

    def count_tokens(self, texts) -> list[int]:
        return self.tokenizer.count_tokens([texts] if isinstance(texts, str) else texts)

    def prefix(self, prompt: str | None) -> str:
        if prompt is None or not self.prompts:
            return ""
        if prompt not in self.prompts:
            raise ValueError(f"unknown prompt {prompt!r}; this engine knows: {', '.join(self.prompts)}")
        return self.prompts[prompt]

    def encode(self, texts, *, prompt: str | None = None, dim: int | None = None, batch_size: int = 32,
               show_progress: bool | None = None) -> np.ndarray:
        """Embed texts -> (N, dim) float32, L2-normalised. ``dim`` below the engine's dim truncates and
        renormalises (Matryoshka: the graph's output is already the normalised prefix of the pooled vector,
        so this equals truncating the pooled vector)."""
        texts = check_texts(texts)
        out_dim = check_encode_args(dim, self.dim, batch_size)
        if not texts:
            return np.zeros((0, out_dim), dtype=np.float32)
        return encode_batches(self.engine.run, self.tokenizer, texts, prefix=self.prefix(prompt), dim=out_dim,
                              full_dim=self.dim, batch_size=batch_size, bucket=self.shape_buckets)


def pad_to_bucket(ids: np.ndarray, mask: np.ndarray, bucket: int, *, pad_id: int, max_length: int):
    """(B, S) ids / mask padded on the right to S' = the next multiple of ``bucket`` (at most ``max_length``,
    never below S) with ``pad_id`` and mask 0. ``bucket`` 0 or 1: unchanged."""
    s = ids.shape[1]
    if bucket <= 1 or s == 0:
        return ids, mask
    target = max(s, min(-(-s // bucket) * bucket, max_length))
    if target == s:
        return ids, mask
    pad = ((0, 0), (0, target - s))
    return np.pad(ids, pad, constant_values=pad_id), np.pad(mask, pad, constant_values=0)


def length_order(texts: list[str]) -> np.ndarray:
    """The order ``encode_batches`` runs texts in: longest first (stable), so batches carry less padding."""
    return np.argsort([-len(t) for t in texts], kind="stable")


def encode_batches(run, tokenizer: Tokenizer, texts: list[str], *, prefix: str, dim: int, full_dim: int,
                   batch_size: int, bucket: int = 0) -> np.ndarray:
    """The encode loop shared by engines and the verification reference: sort by length (less padding),
    tokenise, pad the length to a multiple of ``bucket`` (0: off), ``run(ids, mask) -> (B, full_dim)``,
    truncate to ``dim`` and renormalise."""
    order = length_order(texts)
    result = np.empty((len(texts), dim), dtype=np.float32)
    truncated = 0
    for s in range(0, len(texts), batch_size):
        idx = order[s : s + batch_size]
        ids, mask, n = tokenizer([prefix + texts[i] for i in idx])
        ids, mask = pad_to_bucket(ids, mask, bucket, pad_id=tokenizer.pad_id, max_length=tokenizer.max_length)
        truncated += n
        emb = np.asarray(run(ids, mask), dtype=np.float32)[:, :dim]
        if dim != full_dim:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        result[idx] = emb
    if truncated:
        log.info("%d of %d texts were longer than %d tokens and were truncated", truncated, len(texts),
                 tokenizer.max_length)
    return result


def load_engine(folder: str | Path, *, threads: int = 1, check: bool | None = None,
                shape_buckets: int | None = None) -> EngineEmbedder:
    """Open a compiled engine folder (``moe2edge compile --out DIR``). Its files are compared with the sizes and
    sha256 in ``manifest.json`` first (``IntegrityError`` on a mismatch); ``check=False`` skips that (default:
    on unless ``MOE2EDGE_SKIP_INTEGRITY_CHECK`` is set, see ``moe2edge._integrity``)."""
    return EngineEmbedder(folder, threads=threads, check=check, shape_buckets=shape_buckets)
