"""`moe2edge compile`: checkpoint folder -> verified engine folder for ONNX Runtime / OpenVINO / TensorRT."""

from __future__ import annotations

import json
import logging

from moe2edge.compile._args import add_force, add_integrity, cosine_threshold, positive_int
from moe2edge.targets.base import names

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "compile",
        help="compile a checkpoint into a verified engine folder (onnx | openvino | tensorrt)",
        description=(
            "Export a checkpoint folder (released Nomic format, MoE or dense, or HF BERT) to an engine folder: "
            "pooling + L2 normalisation inside the graph, real sparse MoE routing, dynamic batch and sequence. "
            "With --int8 the graph is quantised with real calibration text (onnx: ORT dynamic per-channel or static "
            "QDQ; openvino: NNCF post-training; tensorrt: symmetric QDQ ONNX + build_engine.sh). Every engine is "
            "run on real text and compared with the PyTorch model before the folder appears (fp32: cosine min >= "
            "0.99999 and max-abs <= 1e-5; int8: cosine min >= 0.99 and SQNR >= 20 dB; both: nDCG@10 loss <= 0.5 percent); "
            "on failure nothing is written. A static student folder compiles to onnx or "
            "openvino with its table lookup + mean in the graph (--int8: weight-only int8 table, no calibration). "
            "The folder runs without torch: "
            "`moe2edge embed --engine DIR` or moe2edge.targets.runtime.load_engine(DIR)."
        ),
    )
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors + tokenizer.json)")
    p.add_argument("--target", required=True, choices=names(), help="compile target")
    p.add_argument("--out", required=True,
                   help="engine folder to write (an engine folder this tool wrote is replaced atomically; anything "
                        "else at that path is refused unless --force)")
    p.add_argument("--int8", action="store_true", help="INT8 post-training quantisation (needs --calibration)")
    p.add_argument("--calibration", default=None,
                   help="calibration text: a UTF-8 file with one text per line, or JSONL (text/query/document fields); "
                        "'dpkg' uses this machine's package descriptions (source packages disjoint from the verification "
                        "and probe sets)")
    p.add_argument("--dim", type=positive_int, default=None, help="Matryoshka output dimension baked into the graph")
    p.add_argument("--quant", choices=("dynamic", "static"), default="dynamic",
                   help="onnx INT8 flavour: dynamic (per-channel weights, default: measured better here) or static QDQ")
    p.add_argument("--ov-precision", choices=("f32", "bf16"), default="f32",
                   help="OpenVINO INFERENCE_PRECISION_HINT recorded in the engine (CPU default would be bf16)")
    p.add_argument("--all-experts", action="store_true",
                   help="dense routing (every expert on every token): the FLOP/speed baseline, not for deployment")
    p.add_argument("--verify-pairs", type=positive_int, default=200,
                   help="real (short, long) description pairs used to verify the engine (default 200)")
    p.add_argument("--verify-file", default=None,
                   help="JSONL of {query, document} pairs to verify with, instead of this machine's package descriptions")
    p.add_argument("--min-cos", type=cosine_threshold, default=None,
                   help="override the cosine-min threshold of the precision (in (0, 1])")
    p.add_argument("--allow-overlap", action="store_true",
                   help="compile even when the calibration / probe / verification texts duplicate each other "
                        "(exactly or nearly); the counts are recorded in the manifest (default: refused)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads while compiling (default 1)")
    p.add_argument("--st-out", default=None,
                   help="also write a sentence-transformers folder (fp32 token-embedding graph) loadable with "
                        "SentenceTransformer(DIR, backend='openvino') (needs optimum-intel)")
    add_force(p, "--out / --st-out")
    add_integrity(p)
    p.set_defaults(func=run)


def read_verify_file(path) -> list[tuple[str, str]]:
    """(query, document) pairs from a JSONL file; each bad line is an error naming file:line."""
    from moe2edge._io import input_file

    pairs = []
    raw = input_file(path, "--verify-file (JSONL of {query, document})").read_bytes()
    for i, line in enumerate(raw.split(b"\n"), 1):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid UTF-8 (byte {e.start} of the line)") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("query"), str) or not isinstance(obj.get("document"), str):
            raise ValueError(f"{path}:{i}: needs string fields 'query' and 'document'")
        for k in ("query", "document"):
            if not obj[k].strip():
                raise ValueError(f"{path}:{i}: field {k!r} is empty or whitespace only (verification needs real text)")
        pairs.append((obj["query"], obj["document"]))
    return pairs


def _check_args(args) -> bool:
    """Everything that can be checked before a model is loaded: inputs exist, outputs may be written (with
    room), options fit the model kind. Returns whether --model is a static student."""
    import tempfile
    from pathlib import Path

    from moe2edge._io import check_writable, input_dir, input_file, safe_output
    from moe2edge._text import MIN_VERIFY_PAIRS
    from moe2edge.student.static import is_static
    from moe2edge.targets.base import CalibrationError, TargetError

    model = input_dir(args.model, "checkpoint folder (config.json + model.safetensors + tokenizer.json)")
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model}: no config.json: not a checkpoint folder")
    if not (model / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model / 'tokenizer.json'}: the checkpoint folder has no tokenizer.json (an engine "
                                "must carry one)")
    static = is_static(model)
    calib_file = args.calibration if args.calibration not in (None, "dpkg") else None
    if calib_file:
        input_file(calib_file, "--calibration file")
    if args.verify_file:
        input_file(args.verify_file, "--verify-file")
    if args.verify_pairs < MIN_VERIFY_PAIRS:
        raise ValueError(f"--verify-pairs {args.verify_pairs}: verification needs >= {MIN_VERIFY_PAIRS} pairs")
    if static:
        if args.target == "tensorrt":
            raise TargetError("a static student has no transformer to build a TensorRT engine for; compile it with "
                              "--target onnx or --target openvino (a table lookup + mean runs on any CPU)")
        if args.st_out:
            raise ValueError("--st-out: a static student is already its own format (moe2edge.student.load_student)")
        if args.calibration is not None:
            log.warning("--calibration %s is not used: a static student's INT8 is its weight-only table", args.calibration)
    elif args.int8 and args.calibration is None:
        raise CalibrationError("--int8 needs --calibration FILE (one text per line, or JSONL) or --calibration dpkg")
    if args.int8 and args.calibration == "dpkg" and args.verify_file and not static:
        raise ValueError("--calibration dpkg needs this machine's package descriptions (not with --verify-file)")
    inputs = [args.model, calib_file, args.verify_file]
    weights = sum(p.stat().st_size for p in model.glob("model*.safetensors"))  # ~ the fp32 graph's size
    safe_output(args.out, inputs=inputs, force=args.force, kinds=("engine",), need_bytes=weights)
    check_writable(Path(tempfile.gettempdir()) / "x", flag="temporary folder (TMPDIR)", need_bytes=2 * weights)
    if args.st_out:
        if Path(args.st_out).resolve() == Path(args.out).resolve():
            raise ValueError(f"--st-out {args.st_out} and --out {args.out} are the same path; give two folders")
        safe_output(args.st_out, inputs=inputs + [args.out], force=args.force, kinds=("sentence-transformers",),
                    flag="--st-out", need_bytes=weights)
    return static


def _text_sets(args) -> tuple[list, list, tuple | None, dict | None]:
    """(verification pairs, dpkg calibration texts, dpkg probe halves, split report).

    From this machine's package descriptions: three sets of disjoint source-package and near-duplicate
    groups (``data/installed.installed_text_sets``): verification, calibration, and the INT8 fallback's
    probe (itself two group-disjoint halves). With --verify-file the pairs come from the file and the
    dpkg sets are not read (--calibration dpkg is then refused)."""
    if args.verify_file:
        return read_verify_file(args.verify_file)[: args.verify_pairs], [], None, {"verification": args.verify_file}
    from moe2edge.data.installed import compile_text_sets

    return compile_text_sets(verify_pairs=args.verify_pairs)


def run(args) -> int:
    import torch

    from moe2edge.targets.base import CompileConfig
    from moe2edge.targets.build import compile_engine, read_texts
    from moe2edge.teacher.checkpoint import checkpoint_hash, load_pretrained

    from moe2edge._text import check_text_pairs

    static = _check_args(args)  # before any heavy work
    torch.set_num_threads(args.threads)
    kw = {"target": args.target, "precision": "int8" if args.int8 else "fp32", "dim": args.dim,
          "ort_quant": args.quant, "ov_precision_hint": args.ov_precision, "all_experts": args.all_experts}
    if args.min_cos is not None:
        kw["int8_cos_min" if args.int8 else "fp32_cos_min"] = args.min_cos
    cfg = CompileConfig(**kw)
    from pathlib import Path

    from moe2edge.student.static import load_static
    from moe2edge.targets.runtime import Tokenizer as _Tok

    pairs, dpkg_texts, dpkg_probe, split = _text_sets(args)
    check_text_pairs(pairs, where=args.verify_file or "this machine's package descriptions")
    calib, probe = None, None
    if args.int8 and not static:
        if args.calibration == "dpkg":
            calib, probe = dpkg_texts, dpkg_probe
            split = {**(split or {}), "calibration": "dpkg"}
        else:  # a user's file: its probe is a third of its own near-duplicate groups (build.text_sets)
            calib = read_texts(args.calibration)
            split = {**(split or {}), "calibration": args.calibration}
        if args.calibration == "dpkg" and not calib:
            raise ValueError("--calibration dpkg needs this machine's package descriptions (not with --verify-file)")
    if static:  # a static student: token table + mean, weight-only INT8
        model = load_static(args.model).to_model().eval()
    else:
        model = load_pretrained(args.model)  # CheckpointError names the bad file/tensor; file hashes checked
    tok_file = Path(args.model) / "tokenizer.json"
    _Tok(tok_file, max_length=model.config.max_seq_length, pad_id=model.config.pad_token_id).check_fits(
        model.config.vocab_size)
    if args.dim is not None and args.dim > model.config.hidden_size:
        raise ValueError(f"--dim {args.dim} is larger than the model's hidden size {model.config.hidden_size}")
    manifest = compile_engine(model=model, tokenizer_file=tok_file, out_dir=args.out, cfg=cfg, verify_pairs=pairs,
                              calibration_texts=calib, probe_texts=probe, allow_overlap=args.allow_overlap,
                              text_split=split, source_hash=checkpoint_hash(args.model), force=args.force)
    par = manifest["parity"]
    print(f"built {args.out}: {args.target} {cfg.precision}, verified on {par['n']} real texts: cosine mean "
          f"{par['cos_mean']:.6f} min {par['cos_min']:.6f} max-abs {par['max_abs']:.2e} SQNR {par['sqnr_db']:.1f} dB, nDCG@10 "
          f"{par['ndcg@10_engine']:.4f} (PyTorch {par['ndcg@10_pytorch']:.4f}, delta {par['ndcg@10_delta']:+.4f})")
    if args.st_out:
        from moe2edge.targets.base import Sample
        from moe2edge.targets.interop import write_st_folder
        from moe2edge.targets.runtime import Tokenizer

        tok = Tokenizer(tok_file, max_length=model.config.max_seq_length, pad_id=model.config.pad_token_id)
        write_st_folder(model, args.model, args.st_out, Sample(*tok(["a sample sentence for tracing", "two"])[:2]),
                        force=args.force)
        print(f"wrote {args.st_out}: SentenceTransformer({args.st_out!r}, backend='openvino')")
    if args.target == "tensorrt":
        print("TensorRT: the verified QDQ ONNX and build_engine.sh / build_engine.py are written; the engine itself "
              "needs TensorRT + a CUDA GPU: run build_engine.sh there.")
    return 0
