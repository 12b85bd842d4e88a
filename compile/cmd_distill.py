"""`moe2edge distill`: build a student of a teacher (pruned experts | dense FFN | static table), distil, save."""

from __future__ import annotations

from pathlib import Path

from moe2edge.compile._args import add_force, add_integrity, int_list, nonneg_float, nonneg_int, positive_float, positive_int

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KINDS = ("pruned", "dense", "static")


def register(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="distil the MoE teacher into a pruned-expert, dense or static student",
        description="Build a student from a teacher folder and fine-tune it towards the teacher (cosine/MSE on "
        "the embeddings, KL of in-batch score distributions, InfoNCE on real pairs; the teacher's Trainer). "
        "pruned: keep N experts per MoE layer scored on calibration text, lower top-k, optionally merge the "
        "dropped experts; dense: one FFN per MoE layer from the usage-weighted expert merge, optionally fewer "
        "layers / a narrower FFN; static: model2vec-style token table (PCA + frequency weighting), no "
        "transformer at run time. Defaults come from configs/student-KIND.json; flags override it. The output "
        "folder loads with moe2edge.student.load_student (pruned/dense also with load_embedder) and carries "
        "student_manifest.json (teacher checkpoint hash, recipe, data hash).",
    )
    p.add_argument("--teacher", required=True, help="teacher checkpoint folder (released nomic_bert format)")
    p.add_argument("--student", required=True, choices=KINDS, help="student kind")
    p.add_argument("--out", required=True,
                   help="student folder to write (a student folder this tool wrote is replaced; anything else is "
                        "refused unless --force)")
    p.add_argument("--config", default=None, help="recipe JSON (default: configs/student-KIND.json)")
    g = p.add_argument_group("pruned")
    g.add_argument("--experts", type=positive_int, default=None, help="experts kept per MoE layer")
    g.add_argument("--top-k", type=positive_int, default=None, help="experts per token in the student")
    g.add_argument("--score", choices=("router", "output_norm"), default=None,
                   help="expert score: routing frequency x router mass, or gated output norm")
    g.add_argument("--merge", action=_Bool, default=None, help="merge dropped experts into kept ones (--no-merge)")
    g.add_argument("--normalize", action=_Bool, default=None,
                   help="renormalise the top-k gate weights (--no-normalize keeps the released form)")
    g.add_argument("--rescale", action=_Bool, default=None,
                   help="fold a least-squares output scale into w2/fc2 (--no-rescale)")
    g = p.add_argument_group("dense")
    g.add_argument("--init", choices=("merge", "top"), default=None, help="FFN from the expert merge or the top expert")
    g.add_argument("--layers", type=int_list, default=None, help="teacher layers to keep, comma-separated (e.g. 0,2,4)")
    g.add_argument("--intermediate-size", type=positive_int, default=None, help="FFN width of the student")
    g.add_argument("--refit", action=_Bool, default=None,
                   help="re-solve the narrow FFN's output projection by least squares to reproduce the "
                        "teacher layer's FFN output on calibration tokens (--no-refit: just drop units)")
    g = p.add_argument_group("static")
    g.add_argument("--dim", type=positive_int, default=None, help="PCA dimension of the token table")
    g.add_argument("--weighting", choices=("none", "zipf", "sif"), default=None, help="token frequency weighting")
    g.add_argument("--vocab", choices=("all", "corpus"), default=None,
                   help="table rows: every vocabulary token, or only those the training pairs use (a SentencePiece "
                   "Unigram tokenizer pruned to match: e5's 250k rows -> ~50k for 8,000 pairs of 17 languages)")
    g = p.add_argument_group("data and training")
    g.add_argument("--pairs", default=None, help="training pairs JSONL (calibration text and fine-tune)")
    g.add_argument("--steps", type=nonneg_int, default=None, help="fine-tune steps (0: build only)")
    g.add_argument("--lr", type=positive_float, default=None)
    g.add_argument("--batch-size", type=positive_int, default=None)
    g.add_argument("--contrastive-weight", type=nonneg_float, default=None)
    g.add_argument("--embedding-weight", type=nonneg_float, default=None)
    g.add_argument("--similarity-weight", type=nonneg_float, default=None)
    g.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    add_force(p)
    add_integrity(p)
    p.set_defaults(func=run)


class _Bool:
    """--flag / --no-flag without argparse.BooleanOptionalAction's help quirks on old Pythons."""

    def __new__(cls, *a, **kw):
        import argparse

        return argparse.BooleanOptionalAction(*a, **kw)


def build_config(args) -> dict:
    """The recipe: the config file, then the flags that were given."""
    from moe2edge.student.recipe import load_recipe

    cfg = load_recipe(args.config or CONFIGS / f"student-{args.student}.json")
    st = cfg.setdefault("student", {})
    if not isinstance(st, dict):
        raise ValueError(f"{args.config or 'student config'}: section 'student' must be an object")
    if st.get("kind", args.student) != args.student:
        raise ValueError(f"--student {args.student} but the config is for kind {st['kind']!r}")
    st["kind"] = args.student
    flag_names = {"num_experts": "--experts"}
    flags = {"num_experts": args.experts, "top_k": args.top_k, "score": args.score, "merge": args.merge,
             "normalize": args.normalize, "rescale": args.rescale, "init": args.init,
             "intermediate_size": args.intermediate_size, "refit": args.refit, "dim": args.dim, "weighting": args.weighting,
             "layers": args.layers, "vocab": args.vocab}
    from moe2edge.student.recipe import STUDENT_KEYS

    for k, v in flags.items():
        if v is not None:
            if k not in STUDENT_KEYS[args.student]:
                raise ValueError(f"{flag_names.get(k, '--' + k.replace('_', '-'))} does not apply to a {args.student} student")
            st[k] = v
    if args.pairs:
        cfg.setdefault("data", {})["pairs"] = args.pairs
    for k, v in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size)):
        if v is not None:
            cfg.setdefault("train", {})[k] = v
    for k in ("contrastive_weight", "embedding_weight", "similarity_weight"):
        if getattr(args, k) is not None:
            cfg.setdefault("loss", {})[k] = getattr(args, k)
    return cfg


def run(args) -> int:
    import torch

    from moe2edge.student.recipe import distill_from_config

    from moe2edge._io import input_dir, safe_output
    from moe2edge.student.recipe import validate_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = validate_recipe(build_config(args))  # every key and type, before the teacher is loaded
    input_dir(args.teacher, "--teacher checkpoint folder")
    pairs = (cfg.get("data") or {}).get("pairs")
    safe_output(args.out, inputs=[args.teacher, pairs, args.config], force=args.force, kinds=("student",))
    student, m = distill_from_config(cfg, teacher_path=args.teacher, out=args.out, force=args.force)
    params = m.get("params", {})
    print(f"wrote {args.out}: {args.student} student"
          + (f", {params['active_non_embedding'] / 1e6:.2f}M active non-embedding params" if params else "")
          + f"; teacher {m['teacher']['checkpoint_hash'][:12]}")
    return 0
