"""`moe2edge export hf`: a dense student as a standard transformers + sentence-transformers folder."""

from __future__ import annotations

from moe2edge.compile._args import add_force, add_integrity, positive_float, positive_int

# Export formats (optimum-cli style `export FORMAT`): name -> one-line description for --help.
FORMATS = {
    "hf": "BertModel + sentence-transformers folder (Transformer -> mean Pooling -> Normalize), no custom code",
}


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a dense student as a standard transformers / sentence-transformers folder",
        description="Write a dense, learned-position checkpoint (e.g. `moe2edge distill --student dense` of a BERT-family "
        "teacher, MiniLM WordPiece or XLM-R SentencePiece vocabulary) as a folder that SentenceTransformer(DIR) and "
        "transformers.AutoModel.from_pretrained(DIR) load without custom code: BertModel weights, the tokenizer "
        "(tokenizer.json + tokenizer_config.json), prompts, mean pooling + Normalize, max_seq_length. Before the "
        "folder appears it is loaded with transformers and must give the model's token ids and embeddings "
        "(max abs <= --atol) on real text; otherwise nothing is written. MoE and rotary models are refused "
        "with the reason (no standard class computes them).",
    )
    p.add_argument("format", choices=list(FORMATS), help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    p.add_argument("--model", required=True, help="checkpoint folder (dense student, released nomic_bert format or HF BERT)")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically if it exists)")
    p.add_argument("--verify-texts", type=positive_int, default=64,
                   help="real texts (this machine's package descriptions) for the parity check (default 64)")
    p.add_argument("--verify-file", default=None, help="UTF-8 file, one text per line, to verify with instead")
    p.add_argument("--atol", type=positive_float, default=1e-5, help="max |embedding difference| allowed (default 1e-5)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check (recorded in the manifest)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    add_force(p)
    add_integrity(p)
    p.set_defaults(func=run)


def _verify_texts(args) -> list[str] | None:
    if args.no_verify:
        return None
    if args.verify_file:
        from moe2edge.targets.build import read_texts

        texts = read_texts(args.verify_file)
    else:
        from moe2edge.data.installed import installed_descriptions

        # short and long descriptions interleaved: batches mix lengths, so padding is exercised
        texts = [t for p in installed_descriptions(limit=None) for t in p]
    texts = texts[: args.verify_texts]
    if not texts:
        raise ValueError("no texts to verify with (--verify-file is empty?); pass --no-verify to skip the check")
    return texts


def run(args) -> int:
    import torch

    from moe2edge.student.static import is_static
    from moe2edge.targets.hf_folder import write_hf_folder
    from moe2edge.teacher.checkpoint import checkpoint_hash, load_pretrained

    from moe2edge._io import input_dir, input_file, safe_output

    # Everything checkable before the model is loaded: the input exists, the output may be written.
    input_dir(args.model, "checkpoint folder (--model)")
    if args.verify_file:
        input_file(args.verify_file, "--verify-file")
    safe_output(args.out, inputs=[args.model, args.verify_file], force=args.force, kinds=("hf-folder",))
    torch.set_num_threads(args.threads)
    if is_static(args.model):
        raise ValueError(f"{args.model}: a static student is a token table, not a transformer: it has no BertModel form "
                         "(load it with moe2edge.student.load_student, or compile it: `moe2edge compile`)")
    model = load_pretrained(args.model)
    texts = _verify_texts(args)
    m = write_hf_folder(model, tokenizer_dir=args.model, out_dir=args.out, verify_texts=texts, atol=args.atol,
                        source_hash=checkpoint_hash(args.model), force=args.force)
    par = m["parity"]
    check = (f"verified on {par['n']} real texts: token ids equal, max |embedding diff| {par['max_abs']:.1e}"
             if par else "NOT verified (--no-verify)")
    print(f"wrote {args.out}: BertModel, {model.config.num_layers} layers; {check}. "
          f"Load: SentenceTransformer({args.out!r}) or transformers.AutoModel.from_pretrained({args.out!r})")
    return 0
