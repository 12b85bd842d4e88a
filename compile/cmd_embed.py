"""`moe2edge embed`: embed lines of text with a checkpoint folder."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embed text lines with a model folder and write .npy",
        description="Embed one text per line (from --input or stdin) with a checkpoint folder (released "
        "Nomic format or HF BERT) and write a float32 .npy of L2-normalised embeddings.",
    )
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--input", default="-", help="UTF-8 text file, one text per line (default: stdin)")
    p.add_argument("--output", required=True, help="output .npy path")
    p.add_argument("--prompt", default=None, help="prompt name, e.g. search_query or search_document")
    p.add_argument("--dim", type=int, default=None, help="Matryoshka output dimension (default: full)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from moe2edge._io import atomic_write_bytes
    from moe2edge.teacher import load_embedder

    raw = sys.stdin.buffer.read() if args.input == "-" else open(args.input, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{args.input}: not valid UTF-8 at line {line} (byte {e.start})") from None
    lines = text.splitlines()
    emb = load_embedder(args.model).encode(lines, prompt=args.prompt, dim=args.dim, batch_size=args.batch_size)
    import io

    buf = io.BytesIO()
    np.save(buf, emb)
    atomic_write_bytes(args.output, buf.getvalue())
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {args.output}")
    return 0
