"""`moe2edge embed`: embed lines of text with a checkpoint folder (PyTorch) or a compiled engine folder."""

from __future__ import annotations

import sys

from moe2edge.compile._args import add_integrity, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embed text lines with a model folder and write .npy",
        description="Embed one text per line (from --input or stdin) with a checkpoint folder (released "
        "Nomic format or HF BERT; PyTorch) or a compiled engine folder (`moe2edge compile`; no torch needed) "
        "and write a .npy of L2-normalised embeddings: float32, or quantised with --precision (int8 with calibrated "
        "ranges saved beside the output for reuse on queries, or packed binary).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint or student folder (runs with PyTorch / numpy)")
    src.add_argument("--engine", help="engine folder from `moe2edge compile` (runs with its runtime, no torch)")
    p.add_argument("--threads", type=positive_int, default=None, help="runtime threads for --engine (default 1)")
    p.add_argument("--input", default="-", help="UTF-8 text file, one text per line (default: stdin)")
    p.add_argument("--output", required=True, help="output .npy path (never one of the inputs)")
    p.add_argument("--prompt", default=None, help="prompt name, e.g. search_query or search_document")
    p.add_argument("--dim", type=positive_int, default=None, help="Matryoshka output dimension (default: full)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    add_integrity(p)
    p.add_argument("--precision", default="float32", choices=("float32", "int8", "uint8", "binary", "ubinary"),
                   help="stored precision (sentence-transformers' quantize_embeddings semantics): int8/uint8 = one "
                   "byte per dimension with per-dimension ranges; ubinary = sign bits packed with np.packbits "
                   "(D/8 bytes), binary = the same minus 128 as int8 (default float32)")
    p.add_argument("--ranges", default=None, metavar="FILE",
                   help="int8/uint8: reuse these (2, D) ranges (e.g. the corpus's, for queries). Without it the "
                   "ranges are computed from these texts and written beside --output as NAME.ranges.npy")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from moe2edge._io import atomic_write_bytes, input_file, safe_output

    from moe2edge.data import quantize as qz

    if args.ranges and args.precision not in qz.SCALAR:
        raise ValueError(f"--ranges applies to --precision int8|uint8, not {args.precision}")
    if args.input != "-":
        input_file(args.input, "--input text file")
    inputs = [args.input, args.model or args.engine, args.ranges]
    safe_output(args.output, inputs=inputs, folder=False, flag="--output")
    if args.precision in qz.SCALAR and not args.ranges:  # the ranges file written beside the codes
        safe_output(qz.default_ranges_path(args.output), inputs=inputs, folder=False, flag="--output (its ranges file)")
    given_ranges = qz.load_ranges(args.ranges) if args.ranges else None  # a bad file fails before any encoding
    raw = sys.stdin.buffer.read() if args.input == "-" else open(args.input, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{args.input}: not valid UTF-8 at line {line} (byte {e.start})") from None
    lines = text.splitlines()
    where = "stdin" if args.input == "-" else args.input
    if not any(t.strip() for t in lines):
        raise ValueError(f"{where}: no text lines: nothing to embed (write one text per line)")
    if args.engine:
        from moe2edge.targets.runtime import load_engine

        embedder = load_engine(args.engine, threads=args.threads or 1)
        prompts = embedder.prompts
    else:
        from moe2edge.student import load_student

        embedder = load_student(args.model)  # a checkpoint (teacher, pruned / dense student) or a static student
        prompts = embedder.config.prompts
    if args.prompt is not None and args.prompt not in prompts:  # the library ignores prompts a model lacks
        raise ValueError(f"--prompt {args.prompt!r}: this model knows "
                         + (", ".join(prompts) if prompts else "no prompts (embed without --prompt)"))
    emb = embedder.encode(lines, prompt=args.prompt, dim=args.dim, batch_size=args.batch_size)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise ValueError(f"{args.model or args.engine}: {int(bad.sum())} of {len(lines)} embeddings are not finite "
                         f"(NaN / inf; first at line {int(np.argmax(bad)) + 1}): the model is broken; nothing written")
    import io

    codes, ranges_out = _quantise(emb, args, given_ranges)
    buf = io.BytesIO()
    np.save(buf, codes)
    if ranges_out is not None:  # the ranges land first: codes never exist without the ranges they need
        ranges_path = qz.save_ranges(qz.default_ranges_path(args.output), ranges_out)
    try:
        atomic_write_bytes(args.output, buf.getvalue())
    except BaseException:
        if ranges_out is not None:
            ranges_path.unlink(missing_ok=True)
        raise
    what = "embeddings" if args.precision == "float32" else f"{args.precision} codes of {emb.shape[1]}-d embeddings"
    print(f"wrote {codes.shape[0]} x {codes.shape[1]} {what} to {args.output}")
    if ranges_out is not None:
        print(f"wrote ranges to {ranges_path}: quantise queries alike with --ranges {ranges_path}")
    return 0


def _quantise(emb, args, given_ranges):
    """(codes, ranges to write | None) for ``--precision``."""
    from moe2edge.data import quantize as qz

    if args.precision not in qz.SCALAR:
        return qz.quantize(emb, args.precision), None
    if given_ranges is not None:
        return qz.quantize(emb, args.precision, ranges=qz.check_ranges(given_ranges, emb.shape[1], where=args.ranges)), None
    ranges = qz.calibration_ranges(emb)
    return qz.quantize(emb, args.precision, ranges=ranges), ranges
