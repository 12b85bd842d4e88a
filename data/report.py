"""Render evaluation results (``moe2edge.eval/v1`` JSON) as Markdown + a self-contained HTML page.

Every model (teacher, students, baselines) is one row of the same tables: quality (nDCG@10 overall,
English, mean cross-lingual, R@100, MRR@10), cost (params, size, latency p50/p95, peak RSS) and,
for students, agreement with their teacher; a second table has nDCG@10 per language. A
quality-vs-latency scatter plot (matplotlib, Agg) is written as PNG and embedded in the HTML as
base64, so the page is one file. All files are written atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


RESULT_SCHEMA = "moe2edge.eval/v1"  # = moe2edge.data.evaluate.SCHEMA (not imported: keep this module light)
_METRICS = ("ndcg@10", "recall@100", "mrr@10")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_run(r, where: str) -> None:
    """One eval run: the fields the tables read exist and are finite numbers in range; ValueError naming the
    file, the run and the key otherwise (a NaN would print as 'nan', a string as "Unknown format code 'f'")."""
    if not isinstance(r, dict):
        raise ValueError(f"{where}: a run must be a JSON object, got {type(r).__name__}")
    if r.get("schema", RESULT_SCHEMA) != RESULT_SCHEMA:
        raise ValueError(f"{where}: schema {r.get('schema')!r}, expected {RESULT_SCHEMA!r} (from `moe2edge eval --out`)")
    model, metrics = r.get("model"), r.get("metrics")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not isinstance(metrics, dict):
        raise ValueError(f"{where}: not a moe2edge eval result (expected 'model' with a 'name' and 'metrics')")
    where = f"{where} ({model['name']})"
    overall, per = metrics.get("overall"), metrics.get("per_language", {})
    if not isinstance(overall, dict) or not isinstance(per, dict):
        raise ValueError(f"{where}: metrics.overall and metrics.per_language must be objects")
    for scope, block in [("overall", overall)] + [(f"per_language.{k}", v) for k, v in per.items()]:
        if not isinstance(block, dict):
            raise ValueError(f"{where}: metrics.{scope} must be an object")
        for m in _METRICS if scope == "overall" else ("ndcg@10",):
            v = block.get(m)
            if not _is_num(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{where}: metrics.{scope}.{m} is {v!r}, expected a number in [0, 1]")
    for tkey, row in [(f"{blk}.{k}", v) for blk in ("latency", "latency_fixed") for k, v in (r.get(blk) or {}).items()
                      if k.startswith("threads=")]:
        for bkey, cell in (row or {}).items() if isinstance(row, dict) else [(None, row)]:
            for k in ("p50_ms", "p95_ms"):
                v = cell.get(k) if isinstance(cell, dict) else cell
                if v is not None and (not _is_num(v) or v < 0):
                    raise ValueError(f"{where}: {tkey}.{bkey}.{k} is {v!r}, expected a number >= 0")
    for k in ("params", "size_bytes"):
        v = model.get(k)
        if v is not None and not _is_num(v):
            raise ValueError(f"{where}: model.{k} is {v!r}, expected a number")


def load_results(paths: list[str | Path]) -> list[dict]:
    """Runs from result files (``{"schema", "runs": [...]}`` or a single run); later files win on equal names.
    Every run is checked (``check_run``) before anything is rendered."""
    runs: dict[str, dict] = {}
    for p in paths:
        p = Path(p)
        from moe2edge._io import read_json_file

        obj = read_json_file(p, "results file (`moe2edge eval --out`)")  # names the file / line of bad JSON
        if isinstance(obj, dict) and "runs" in obj:
            if obj.get("schema", RESULT_SCHEMA) != RESULT_SCHEMA:
                raise ValueError(f"{p}: schema {obj.get('schema')!r}, expected {RESULT_SCHEMA!r} "
                                 "(from `moe2edge eval --out`)")
            items = obj["runs"]
        else:
            items = [obj]
        if not isinstance(items, list) or not items:
            raise ValueError(f"{p}: not a moe2edge eval result (expected 'runs' with 'model' and 'metrics')")
        for i, r in enumerate(items):
            check_run(r, f"{p}: run {i}")
            runs[f"{r['model']['name']}@{(r.get('dataset') or {}).get('name', '')}"] = r
    return list(runs.values())


def _lat(run: dict, threads: str, batch: str, key: str, block: str = "latency"):
    """``latency`` is measured on held-out real text of varying length (each text once); ``latency_fixed``
    on 128-token inputs of one shape; ``search_latency`` is the corpus search alone."""
    row = run.get(block) or {}
    row = row if block == "search_latency" else row.get(threads, {})
    return (row.get(batch) or {}).get(key)


def _all_threads_key(run: dict) -> str | None:
    keys = sorted((k for k in (run.get("latency") or {}) if k.startswith("threads=") and k != "threads=1"),
                  key=lambda k: int(k.split("=")[1]))
    return keys[-1] if keys else None


def _xling(run: dict):
    langs = run["metrics"].get("per_language", {})
    vals = [v["ndcg@10"] for k, v in langs.items() if k not in ("en", "all")]
    return sum(vals) / len(vals) if vals else None


def _f(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def _ms(run, threads, batch):
    p50, p95 = _lat(run, threads, batch, "p50_ms"), _lat(run, threads, batch, "p95_ms")
    if p50 is None:
        return "–"
    return f"{p50:.1f} / {p95:.1f}" if p50 < 100 else f"{p50:.0f} / {p95:.0f}"


def _params(n):
    return "–" if not n else f"{n / 1e6:.1f}M"


def _size(b):
    return "–" if not b else f"{b / 2**20:.1f}"


def tables(runs: list[dict]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(main header, main rows, per-language header, per-language rows) as strings."""
    head = ["model", "kind", "params", "size MB", "nDCG@10", "nDCG@10 en", "nDCG@10 x-ling", "R@100", "MRR@10",
            "ms b1 1t (p50/p95)", "ms b32 1t (p50/p95)", "ms b1 all-t", "ms b32 all-t", "ms b1 1t fixed 128",
            "search ms b1", "peak RSS MB",
            "top-10 overlap w/ teacher"]
    rows = []
    for r in runs:
        m, o = r["model"], r["metrics"]["overall"]
        en = r["metrics"].get("per_language", {}).get("en", {}).get("ndcg@10")
        at = _all_threads_key(r)
        agr = r.get("agreement") or {}
        rows.append([m["name"], m.get("kind", ""), _params(m.get("params")), _size(m.get("size_bytes")),
                     _f(o["ndcg@10"]), _f(en), _f(_xling(r)), _f(o["recall@100"]), _f(o["mrr@10"]),
                     _ms(r, "threads=1", "batch=1"), _ms(r, "threads=1", "batch=32"),
                     _ms(r, at, "batch=1") if at else "–", _ms(r, at, "batch=32") if at else "–",
                     _f(_lat(r, "threads=1", "batch=1", "p50_ms", "latency_fixed"), 2),
                     _f(_lat(r, "", "batch=1", "p50_ms", "search_latency"), 2),
                     _f((r.get("memory") or {}).get("peak_rss_mb"), 0),
                     _f(agr.get("topk_overlap")) + (f" ({agr.get('teacher')})" if agr.get("teacher") else "")
                     if agr else "–"])
    langs = sorted({k for r in runs for k in r["metrics"].get("per_language", {})},
                   key=lambda k: (k != "en", k))
    lhead = ["model"] + [f"{k} (n={_nq(runs, k)})" for k in langs]
    lrows = [[r["model"]["name"]] + [_f(r["metrics"]["per_language"].get(k, {}).get("ndcg@10")) for k in langs]
             for r in runs]
    return head, rows, lhead, lrows


def _nq(runs, lang):
    return max(r["metrics"]["per_language"].get(lang, {}).get("n_queries", 0) for r in runs)


def _md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def scatter_png(runs: list[dict], *, metric: str = "ndcg@10") -> bytes | None:
    """Quality (overall ``metric``) vs latency (p50 ms, batch 1, one thread), labelled points; None if no latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["model"]["name"], _lat(r, "threads=1", "batch=1", "p50_ms"), r["metrics"]["overall"][metric])
           for r in runs]
    pts = [p for p in pts if p[1] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    import math

    placed: list[tuple[float, float]] = []  # label anchors in (log10 ms, metric) space
    for i, (name, x, y) in enumerate(pts):
        ax.scatter([x], [y], s=60, color=f"C{i % 10}", zorder=3)
        # models with near-equal quality and latency (a teacher and its pruned student) would print
        # their labels on top of each other: stack such labels downwards
        near = sum(1 for px, py in placed if abs(px - math.log10(max(x, 1e-6))) < 0.6 and abs(py - y) < 0.02)
        placed.append((math.log10(max(x, 1e-6)), y))
        ax.annotate(name, (x, y), xytext=(6, 6 - 13 * near), textcoords="offset points", fontsize=9)
    xs = [p[1] for p in pts]
    if max(xs) / max(min(xs), 1e-3) > 20:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ys = [p[2] for p in pts]
    pad = max(0.02, (max(ys) - min(ys)) * 0.15)
    ax.set_ylim(max(0.0, min(ys) - pad), min(1.0, max(ys) + pad))
    log_x = ax.get_xscale() == "log"
    ax.set_xlim(min(xs) / 1.6 if log_x else 0, max(xs) * (4 if log_x else 1.35))  # room for the labels
    ax.set_xlabel("latency p50, ms per query (batch 1, real text of varying length, 1 thread)")
    ax.set_ylabel(f"{metric.replace('ndcg', 'nDCG')} (all queries, all languages)")
    ax.set_title("Quality vs latency (up and left is better)")
    ax.grid(True, alpha=0.3, zorder=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _atomic(path: Path, data: bytes) -> None:
    from moe2edge._io import atomic_write_bytes

    atomic_write_bytes(path, data)  # temp + rename, removed on error (a full disk leaves no .tmp file)


def _notes(runs) -> list[str]:
    notes = []
    ds = sorted({f"{r['dataset']['name']} ({r['dataset']['n_docs']} docs, {r['dataset']['n_evaluated']} judged queries)"
                 for r in runs if "dataset" in r})
    notes.append("Dataset: " + "; ".join(ds))
    notes.append("x-ling = mean nDCG@10 over non-English query languages (English corpus). Latency: ms per encode "
                 "call of a batch of 128-token texts (p50 / p95); BM25: tokenise + search per batch. "
                 "Peak RSS is the evaluating process's peak.")
    for r in runs:
        for w in r.get("warnings", []):
            notes.append(f"{r['model']['name']}: {w}")
    return notes


def render_report(runs: list[dict], out_dir: str | Path, *, title: str = "moe2edge evaluation",
                  sections: list[tuple[str, list[str], list[list[str]]]] | None = None,
                  notes: list[str] | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` (PNG embedded) and ``quality_vs_latency.png`` to ``out_dir``.
    ``sections``: extra (heading, header, rows) tables after the per-language one (e.g. the router load);
    ``notes``: extra bullet lines before the generated ones."""
    if not runs:
        raise ValueError("no evaluation runs to report")
    out_dir = Path(out_dir)
    head, rows, lhead, lrows = tables(runs)
    png = scatter_png(runs)
    notes = list(notes or []) + _notes(runs)
    sections = list(sections or [])
    files = {}
    md = [f"# {title}", "", _md_table(head, rows), "", "## nDCG@10 per query language", "", _md_table(lhead, lrows), ""]
    for heading, shead, srows in sections:
        md += [f"## {heading}", "", _md_table(shead, srows), ""]
    if png:
        files["png"] = out_dir / "quality_vs_latency.png"
        _atomic(files["png"], png)
        md += ["![quality vs latency](quality_vs_latency.png)", ""]
    md += [f"- {n}" for n in notes]
    files["md"] = out_dir / "report.md"
    _atomic(files["md"], ("\n".join(md) + "\n").encode())

    def h_table(hd, rs):
        th = "".join(f"<th>{html.escape(c)}</th>" for c in hd)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rs)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"

    img = (f'<p><img alt="quality vs latency" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'
           if png else "<p>(no latency measured: no plot)</p>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
thead {{ background: #f3f3f3; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{h_table(head, rows)}
<h2>nDCG@10 per query language</h2>
{h_table(lhead, lrows)}
{''.join(f"<h2>{html.escape(h)}</h2>{h_table(sh, sr)}" for h, sh, sr in sections)}
{img}
<ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes)}</ul>
</body></html>
"""
    files["html"] = out_dir / "report.html"
    _atomic(files["html"], page.encode())
    return files
