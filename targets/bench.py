"""Latency / throughput / peak memory / size of engine folders (and a PyTorch checkpoint as baseline).

Each model is measured in its own subprocess (``python -m moe2edge.targets.bench --one KIND PATH``) so
that its peak RSS is its own and one runtime's thread pool cannot disturb another's. Latency comes
from ``moe2edge.data.evaluate.measure_latency`` (the eval harness's helper: 128-token texts built
with the model's own tokenizer, p50/p95 ms per ``encode`` call of a batch).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from moe2edge.errors import UserError

log = logging.getLogger(__name__)

SCHEMA = "moe2edge.bench/v1"


class BenchError(UserError):
    """A model could not be measured because of its input (the child process said why, in one line)."""


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage: Linux carries ru_maxrss across fork + exec, so a
    child started by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _model_bytes(path: Path, kind: str) -> int:
    if kind == "pytorch":
        return sum(p.stat().st_size for p in Path(path).glob("model*.safetensors"))
    spec = json.loads((Path(path) / "engine.json").read_text())
    main = Path(path) / spec["model_file"]
    extra = main.with_suffix(".bin") if main.suffix == ".xml" else None
    return main.stat().st_size + (extra.stat().st_size if extra and extra.exists() else 0)


def bench_one(kind: str, path: str | Path, *, threads=(1, 2), batch_sizes=(1, 32), seq_len: int = 128,
              repeats: dict | None = None) -> dict:
    """Measure one model in this process: ``kind`` is "engine" or "pytorch"."""
    from moe2edge.data.evaluate import measure_latency

    path = Path(path)
    if kind == "pytorch":
        from moe2edge.teacher import load_embedder

        model = load_embedder(path)
        info = {"target": "pytorch", "precision": "fp32", "runtime": "torch",
                "integrity": getattr(model, "integrity", None)}
    else:
        from moe2edge.targets.runtime import load_engine

        model = load_engine(path, threads=threads[0])
        info = {k: model.spec.get(k) for k in ("target", "precision", "runtime", "ov_precision_hint")}
        info["integrity"] = model.integrity  # the compile-time parity below is only meaningful for verified files
        man = path / "manifest.json"
        if man.exists():
            m = json.loads(man.read_text())
            info["parity"] = {k: m["parity"].get(k) for k in ("cos_mean", "cos_min", "max_abs", "ndcg@10_delta")}
            info["routing"] = m["identity"].get("artifact", {}).get("routing")
    lat = measure_latency(model, seq_len=seq_len, batch_sizes=batch_sizes, threads=list(threads),
                          repeats=repeats or {1: 20, 32: 5})
    tput = {}
    for t in threads:
        row = lat.get(f"threads={t}", {})
        b = max(batch_sizes)
        if f"batch={b}" in row:
            tput[f"threads={t}"] = round(b / (row[f"batch={b}"]["p50_ms"] / 1000.0), 1)
    return {"name": path.name, "path": str(path), "kind": kind, **info, "latency": lat,
            "throughput_texts_per_s": tput, "peak_rss_mb": round(peak_rss_mb(), 1),
            "model_bytes": _model_bytes(path, kind), "folder_bytes": _dir_bytes(path)}


def bench(engines: list[str | Path], *, pytorch: str | Path | None = None, threads=(1, 2), repeats=None,
          seq_len: int = 128) -> dict:
    """Measure every model in its own subprocess; returns {"schema", "results": [...]}."""
    jobs = ([("pytorch", pytorch)] if pytorch else []) + [("engine", e) for e in engines]
    results = []
    for kind, path in jobs:
        cmd = [sys.executable, "-m", "moe2edge.targets.bench", "--one", kind, str(path),
               "--threads", *map(str, threads), "--seq-len", str(seq_len)]
        if repeats:
            cmd += ["--repeats", json.dumps(repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log.debug("benchmark subprocess for %s (exit %d):\n%s", path, proc.returncode, proc.stderr[-4000:])
            last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "(no output)")
            if proc.returncode == 2:  # the child's one-line user error
                raise BenchError(f"{path}: {last.removeprefix('error: ')}")
            raise RuntimeError(f"benchmark subprocess for {path} crashed (exit {proc.returncode}): {last}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        log.info("measured %s", path)
    return {"schema": SCHEMA, "seq_len": seq_len, "threads": list(threads), "results": results}


def table(report: dict) -> str:
    """A fixed-width table: one row per model and thread count."""
    head = f"{'model':<28} {'target':<9} {'prec':<5} {'thr':>3} {'b1 p50':>8} {'b1 p95':>8} {'b32 p50':>9} " \
           f"{'b32 p95':>9} {'texts/s':>8} {'peakMB':>7} {'sizeMB':>7} {'cos min':>8}"
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        for t in report["threads"]:
            row = r["latency"].get(f"threads={t}", {})
            b1, b32 = row.get("batch=1", {}), row.get("batch=32", {})
            cos = (r.get("parity") or {}).get("cos_min")
            lines.append(
                f"{r['name'][:28]:<28} {str(r.get('target')):<9} {str(r.get('precision')):<5} {t:>3} "
                f"{b1.get('p50_ms', float('nan')):>8.1f} {b1.get('p95_ms', float('nan')):>8.1f} "
                f"{b32.get('p50_ms', float('nan')):>9.1f} {b32.get('p95_ms', float('nan')):>9.1f} "
                f"{r['throughput_texts_per_s'].get(f'threads={t}', float('nan')):>8.1f} {r['peak_rss_mb']:>7.0f} "
                f"{r['model_bytes'] / 1e6:>7.1f} {'' if cos is None else f'{cos:.5f}':>8}")
    return "\n".join(lines)


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="internal: measure one model (used by moe2edge bench)")
    p.add_argument("--one", nargs=2, metavar=("KIND", "PATH"), required=True)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", default=None)
    a = p.parse_args(argv)
    reps = {int(k): v for k, v in json.loads(a.repeats).items()} if a.repeats else None
    try:
        res = bench_one(a.one[0], a.one[1], threads=tuple(a.threads), seq_len=a.seq_len, repeats=reps)
    except Exception as e:  # noqa: BLE001 - the parent turns our last stderr line into its message
        from moe2edge.errors import is_user_error, one_line

        if not is_user_error(e):
            raise  # a bug: the traceback goes to the parent's debug log
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(_main())
