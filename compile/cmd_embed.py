"""`moe2edge embed`: embed lines of text with a checkpoint folder (PyTorch) or a compiled engine folder."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embed text lines with a model folder and write .npy",
        description="Embed one text per line (from --input or stdin) with a checkpoint folder (released "
        "Nomic format or HF BERT; PyTorch) or a compiled engine folder (`moe2edge compile`; no torch needed) "
        "and write a float32 .npy of L2-normalised embeddings.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder (runs with PyTorch)")
    src.add_argument("--engine", help="engine folder from `moe2edge compile` (runs with its runtime, no torch)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads for --engine (default 1)")
    p.add_argument("--input", default="-", help="UTF-8 text file, one text per line (default: stdin)")
    p.add_argument("--output", required=True, help="output .npy path")
    p.add_argument("--prompt", default=None, help="prompt name, e.g. search_query or search_document")
    p.add_argument("--dim", type=int, default=None, help="Matryoshka output dimension (default: full)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from moe2edge._io import atomic_write_bytes

    raw = sys.stdin.buffer.read() if args.input == "-" else open(args.input, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{args.input}: not valid UTF-8 at line {line} (byte {e.start})") from None
    lines = text.splitlines()
    if args.engine:
        from moe2edge.targets.runtime import load_engine

        embedder = load_engine(args.engine, threads=args.threads or 1)
    else:
        from moe2edge.teacher import load_embedder

        embedder = load_embedder(args.model)
    emb = embedder.encode(lines, prompt=args.prompt, dim=args.dim, batch_size=args.batch_size)
    import io

    buf = io.BytesIO()
    np.save(buf, emb)
    atomic_write_bytes(args.output, buf.getvalue())
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {args.output}")
    return 0
