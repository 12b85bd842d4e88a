"""`moe2edge compile`: checkpoint folder -> verified engine folder for ONNX Runtime / OpenVINO / TensorRT."""

from __future__ import annotations

import json

from moe2edge.targets.base import names


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
    p.add_argument("--out", required=True, help="engine folder to write (replaced atomically if it exists)")
    p.add_argument("--int8", action="store_true", help="INT8 post-training quantisation (needs --calibration)")
    p.add_argument("--calibration", default=None,
                   help="calibration text: a UTF-8 file with one text per line, or JSONL (text/query/document fields); "
                        "'dpkg' uses this machine's package descriptions (source packages disjoint from the verification "
                        "and probe sets)")
    p.add_argument("--dim", type=int, default=None, help="Matryoshka output dimension baked into the graph")
    p.add_argument("--quant", choices=("dynamic", "static"), default="dynamic",
                   help="onnx INT8 flavour: dynamic (per-channel weights, default: measured better here) or static QDQ")
    p.add_argument("--ov-precision", choices=("f32", "bf16"), default="f32",
                   help="OpenVINO INFERENCE_PRECISION_HINT recorded in the engine (CPU default would be bf16)")
    p.add_argument("--all-experts", action="store_true",
                   help="dense routing (every expert on every token): the FLOP/speed baseline, not for deployment")
    p.add_argument("--verify-pairs", type=int, default=200,
                   help="real (short, long) description pairs used to verify the engine (default 200)")
    p.add_argument("--verify-file", default=None,
                   help="JSONL of {query, document} pairs to verify with, instead of this machine's package descriptions")
    p.add_argument("--min-cos", type=float, default=None, help="override the cosine-min threshold of the precision")
    p.add_argument("--allow-overlap", action="store_true",
                   help="compile even when the calibration / probe / verification texts duplicate each other "
                        "(exactly or nearly); the counts are recorded in the manifest (default: refused)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while compiling (default 1)")
    p.add_argument("--st-out", default=None,
                   help="also write a sentence-transformers folder (fp32 token-embedding graph) loadable with "
                        "SentenceTransformer(DIR, backend='openvino') (needs optimum-intel)")
    p.set_defaults(func=run)


def _text_sets(args) -> tuple[list, list, tuple | None, dict | None]:
    """(verification pairs, dpkg calibration texts, dpkg probe halves, split report).

    From this machine's package descriptions: three sets of disjoint source-package and near-duplicate
    groups (``data/installed.installed_text_sets``): verification, calibration, and the INT8 fallback's
    probe (itself two group-disjoint halves). With --verify-file the pairs come from the file and the
    dpkg sets are not read (--calibration dpkg is then refused)."""
    if args.verify_file:
        pairs = []
        with open(args.verify_file, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    obj = json.loads(line)
                    if not isinstance(obj.get("query"), str) or not isinstance(obj.get("document"), str):
                        raise ValueError(f"{args.verify_file}:{i}: needs string fields 'query' and 'document'")
                    pairs.append((obj["query"], obj["document"]))
        return pairs[: args.verify_pairs], [], None, {"verification": args.verify_file}
    from moe2edge.data.installed import installed_text_sets
    from moe2edge.data.textsets import split_descriptions

    sets, report = installed_text_sets()
    halves, hrep = split_descriptions(sets["probe"], shares={"a": 1, "b": 1})
    report["probe_halves"] = hrep["sizes"]
    verify = [(d.short, d.long) for d in sets["verify"]][: args.verify_pairs]
    calib = [t for d in sets["calibration"] for t in (d.short, d.long)]
    probe = tuple([t for d in halves[h] for t in (d.short, d.long)] for h in ("a", "b"))
    return verify, calib, probe, report


def run(args) -> int:
    import torch

    from moe2edge.targets.base import CompileConfig
    from moe2edge.targets.build import compile_engine, read_texts
    from moe2edge.teacher.checkpoint import checkpoint_hash, load_pretrained

    torch.set_num_threads(args.threads)
    kw = {"target": args.target, "precision": "int8" if args.int8 else "fp32", "dim": args.dim,
          "ort_quant": args.quant, "ov_precision_hint": args.ov_precision, "all_experts": args.all_experts}
    if args.min_cos is not None:
        kw["int8_cos_min" if args.int8 else "fp32_cos_min"] = args.min_cos
    cfg = CompileConfig(**kw)
    from pathlib import Path

    from moe2edge.student.static import is_static, load_static

    static = is_static(args.model)
    if static:  # a static student: token table + mean, weight-only INT8
        if args.st_out:
            raise ValueError("--st-out: a static student is already its own format (moe2edge.student.load_student)")
        model = load_static(args.model).to_model().eval()
    else:
        model = load_pretrained(args.model)  # CheckpointError (a ValueError) names the bad file/tensor
    tok_file = Path(args.model) / "tokenizer.json"
    if not tok_file.exists():
        raise FileNotFoundError(f"{tok_file}: the checkpoint folder has no tokenizer.json (an engine must carry one)")
    pairs, dpkg_texts, dpkg_probe, split = _text_sets(args)
    calib, probe = None, None
    if args.int8 and not static:
        if args.calibration is None:
            from moe2edge.targets.base import CalibrationError

            raise CalibrationError("--int8 needs --calibration FILE (one text per line, or JSONL) or --calibration dpkg")
        if args.calibration == "dpkg":
            calib, probe = dpkg_texts, dpkg_probe
            split = {**(split or {}), "calibration": "dpkg"}
        else:  # a user's file: its probe is a third of its own near-duplicate groups (build.text_sets)
            calib = read_texts(args.calibration)
            split = {**(split or {}), "calibration": args.calibration}
        if args.calibration == "dpkg" and not calib:
            raise ValueError("--calibration dpkg needs this machine's package descriptions (not with --verify-file)")
    manifest = compile_engine(model=model, tokenizer_file=tok_file, out_dir=args.out, cfg=cfg, verify_pairs=pairs,
                              calibration_texts=calib, probe_texts=probe, allow_overlap=args.allow_overlap,
                              text_split=split, source_hash=checkpoint_hash(args.model))
    par = manifest["parity"]
    print(f"built {args.out}: {args.target} {cfg.precision}, verified on {par['n']} real texts: cosine mean "
          f"{par['cos_mean']:.6f} min {par['cos_min']:.6f} max-abs {par['max_abs']:.2e} SQNR {par['sqnr_db']:.1f} dB, nDCG@10 "
          f"{par['ndcg@10_engine']:.4f} (PyTorch {par['ndcg@10_pytorch']:.4f}, delta {par['ndcg@10_delta']:+.4f})")
    if args.st_out:
        from moe2edge.targets.base import Sample
        from moe2edge.targets.interop import write_st_folder
        from moe2edge.targets.runtime import Tokenizer

        tok = Tokenizer(tok_file, max_length=model.config.max_seq_length, pad_id=model.config.pad_token_id)
        write_st_folder(model, args.model, args.st_out, Sample(*tok(["a sample sentence for tracing", "two"])[:2]))
        print(f"wrote {args.st_out}: SentenceTransformer({args.st_out!r}, backend='openvino')")
    if args.target == "tensorrt":
        print("TensorRT: the verified QDQ ONNX and build_engine.sh / build_engine.py are written; the engine itself "
              "needs TensorRT + a CUDA GPU: run build_engine.sh there.")
    return 0
