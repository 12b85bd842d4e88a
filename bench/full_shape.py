"""The released model's full shape through every path (issue 12), one command.

    .venv/bin/python bench/full_shape.py [--out runs/full-shape] [--paths onnx-fp32,openvino-fp32,...]

1. writes a checkpoint of the ``nomic-embed-text-v2-moe`` preset (12 x 768, 8 experts top-2 at every
   second layer, 475M parameters, rotary) in the released format with the project's own writer
   (``save_pretrained``; random weights, seeded; nothing is committed) and the imported
   multilingual-e5-small ``tokenizer.json`` (XLM-R's 250k-piece SentencePiece Unigram, the released
   model's tokenizer family);
2. runs each path as its own ``moe2edge`` process, one after the other (so the peak RSS is that
   path's own, from ``os.wait4``), and records stage time, peak RSS, artifact size and, for engines,
   the verification record of their manifest (cosine mean / min, max-abs, router near-tie tokens and
   texts, what was gated);
3. appends every finished path to ``OUT/results.json`` at once: a rerun skips the paths already
   there (``--redo`` measures them again), so a long run can be resumed.

Paths (in the default order, the important ones first): onnx-fp32, openvino-fp32, static, pruned,
dense, onnx-int8, tensorrt-int8 (Q/DQ ONNX verified on CPU; building the plan needs TensorRT + GPU),
openvino-int8, onnx-fp32-all-experts (the dense-routing graph: the FLOP baseline), and two that use the
others' output:

- ``latency``: ``moe2edge bench`` of PyTorch fp32 vs the sparse and the all-experts ONNX engines, each in a
  fresh process, interleaved, 1 thread, batch 1 and 32: held-out varying-length text and the fixed
  128-token shape beside it (needs onnx-fp32 and onnx-fp32-all-experts);
- ``failures``: what a user sees when it goes wrong at this size -- a truncated ``model.safetensors``, a
  missing ``--calibration`` file, and a compile stopped by SIGTERM after the export began: each must exit
  non-zero with one line naming the problem (no traceback) and leave no output or temporary folder.

``--markdown`` prints the tables of results.json for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from moe2edge._io import tree_bytes  # torch-free: this parent's RSS stays ~30 MB (run_measured)

ROOT = Path(__file__).resolve().parents[1]
PRESET = "nomic-embed-text-v2-moe"
MOE2EDGE = [sys.executable, "-m", "moe2edge.compile.cli"]

# path -> the moe2edge arguments after the checkpoint / output (students: the 17-language e5 recipes, which
# fit a 12-layer teacher, training-free (steps 0): the cost measured is the build at this shape, not a
# recipe; the static table keeps the rows of the 250k vocabulary its corpus uses)
PATHS: dict[str, list[str]] = {
    "onnx-fp32": ["compile", "--target", "onnx"],
    "openvino-fp32": ["compile", "--target", "openvino"],
    "static": ["distill", "--student", "static", "--config", "configs/student-e5-static.json", "--steps", "0"],
    "pruned": ["distill", "--student", "pruned", "--config", "configs/student-e5-pruned.json", "--steps", "0"],
    "dense": ["distill", "--student", "dense", "--config", "configs/student-e5-dense.json", "--steps", "0"],
    "onnx-int8": ["compile", "--target", "onnx", "--int8", "--calibration", "dpkg"],
    "tensorrt-int8": ["compile", "--target", "tensorrt", "--int8", "--calibration", "dpkg"],
    "openvino-int8": ["compile", "--target", "openvino", "--int8", "--calibration", "dpkg"],
    "onnx-fp32-all-experts": ["compile", "--target", "onnx", "--all-experts"],
    "latency": [],  # bench_latency()
    "failures": [],  # failures()
}
BENCH_REPEATS = ("10", "3")  # b1, b32 calls per model: a b32 call of the fp32 teacher is ~20 s at this shape


def run_measured(cmd: list[str], log_file: Path) -> dict:
    """Run ``cmd`` as a child; -> returncode, seconds, its own peak RSS (MB), the last stderr line.

    ``ru_maxrss`` of a child counts the parent's RSS at fork (targets/bench.py peak_rss_mb): this parent
    never imports torch (~30 MB), so the figure is the child's own."""
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(p.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    return {"returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024.0), "last_line": lines[-1][-400:] if lines else "",
            "command": shlex.join(cmd[2:] if cmd[:3] == MOE2EDGE else cmd)}


def write_checkpoint(out: Path, seed: int = 0) -> None:
    """The full preset with random weights in the released format + the e5 SentencePiece tokenizer."""
    import torch

    from moe2edge.teacher import NomicMoE, get_preset
    from moe2edge.teacher.checkpoint import save_pretrained
    from moe2edge.teacher.e5_import import e5_checkpoint

    torch.manual_seed(seed)
    model = NomicMoE(get_preset(PRESET)).eval()
    save_pretrained(model, out, tokenizer_dir=e5_checkpoint())
    print(f"wrote {out}: {model.num_parameters():,} parameters")


def engine_record(folder: Path) -> dict:
    man = json.loads((folder / "manifest.json").read_text())
    par = man.get("parity") or man.get("verification") or {}
    keep = ("n", "cos_mean", "cos_min", "max_abs", "sqnr_db", "ndcg@10_rel_loss", "near_tie", "all_texts",
            "near_tie_texts")
    return {k: par[k] for k in keep if k in par}


def bench_latency(out: Path, ckpt: Path) -> dict:
    """PyTorch fp32 vs the sparse and all-experts ONNX engines: ``moe2edge bench``, one run, 1 thread."""
    engines = [out / "onnx-fp32", out / "onnx-fp32-all-experts"]
    missing = [e.name for e in engines if not (e / "manifest.json").exists()]
    if missing:
        return {"returncode": 1, "seconds": 0, "peak_rss_mb": 0, "size_bytes": 0,
                "last_line": f"latency needs the engines {', '.join(missing)}: run those paths first"}
    report = out / "latency.json"
    cmd = MOE2EDGE + ["bench", "--model", str(ckpt), *map(str, engines), "--threads", "1",
                      "--repeats", *BENCH_REPEATS, "--out", str(report)]
    r = run_measured(cmd, out / "latency.log")
    r["size_bytes"] = 0
    if r["returncode"] == 0:
        rep = json.loads(report.read_text())
        r["latency"] = [{"name": x.get("name"), "target": x.get("target"), "routing": x.get("routing"),
                         "real": x["latency"]["threads=1"], "fixed": (x.get("latency_fixed") or {}).get("threads=1"),
                         "vs_pytorch": (x.get("vs_baseline") or {}), "peak_rss_mb": x.get("peak_rss_mb")}
                        for x in rep["results"]]
        r["texts"] = rep.get("texts")
    return r


def _one_check(name: str, cmd: list[str], out: Path, dest: Path, *, stop_after: str | None = None,
               delay: float = 60.0) -> dict:
    """Run ``cmd``; with ``stop_after`` send SIGTERM ``delay`` s after that text appears in its log. -> the verdict."""
    import signal

    log_file = out / f"failures-{name}.log"
    parent_before = set(dest.parent.iterdir())
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        if stop_after:
            seen = None
            while p.poll() is None:
                if seen is None and stop_after in log_file.read_text(errors="replace"):
                    seen = time.perf_counter()
                if seen is not None and time.perf_counter() - seen > delay:
                    p.send_signal(signal.SIGTERM)
                    break
                time.sleep(1)
        rc = p.wait()
    text = log_file.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    left = sorted(str(x.name) for x in set(dest.parent.iterdir()) - parent_before)
    ok = rc != 0 and "Traceback" not in text and not dest.exists() and not left and bool(last)
    return {"ok": ok, "returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "last_line": last[-300:],
            "traceback": "Traceback" in text, "output_exists": dest.exists(), "left_behind": left}


def failures(out: Path, ckpt: Path, delay: float = 60.0) -> dict:
    """Three failures at full shape: each must be a one-line error that leaves nothing behind."""
    import shutil

    bad = out / "corrupt-checkpoint"
    if bad.exists():
        shutil.rmtree(bad)
    shutil.copytree(ckpt, bad, ignore=lambda d, names: ["model.safetensors"] if Path(d) == ckpt else [])
    with open(ckpt / "model.safetensors", "rb") as src, open(bad / "model.safetensors", "wb") as dst:
        dst.write(src.read(64 << 20))  # the header and the first 64 MB of a 1.9 GB file: a cut-off download
    scratch = out / "failures"
    scratch.mkdir(exist_ok=True)
    compile_onnx = MOE2EDGE + ["compile", "--target", "onnx"]
    checks = {
        "truncated-safetensors": _one_check("truncated", compile_onnx + ["--model", str(bad), "--out",
                                            str(scratch / "truncated")], out, scratch / "truncated"),
        # the same file past the integrity manifest: what the safetensors reader itself says
        "truncated-safetensors-no-manifest": _one_check("truncated-raw", compile_onnx + [
            "--model", str(bad), "--skip-integrity-check", "--out", str(scratch / "truncated-raw")], out,
            scratch / "truncated-raw"),
        "missing-calibration": _one_check("calibration", compile_onnx + [
            "--model", str(ckpt), "--int8", "--calibration", str(out / "no-such-calibration.txt"),
            "--out", str(scratch / "calibration")], out, scratch / "calibration"),
        "sigterm-during-export": _one_check("sigterm", compile_onnx + ["--model", str(ckpt), "--out",
                                            str(scratch / "sigterm")], out, scratch / "sigterm",
                                            stop_after="exporting", delay=delay),
    }
    shutil.rmtree(bad)
    return {"returncode": 0 if all(c["ok"] for c in checks.values()) else 1,
            "seconds": round(sum(c["seconds"] for c in checks.values()), 1), "peak_rss_mb": 0, "size_bytes": 0,
            "last_line": "; ".join(f"{k}: {'ok' if c['ok'] else 'FAILED'}" for k, c in checks.items()),
            "checks": checks}


def markdown(results: dict) -> str:
    rows = ["| path | result | time (s) | peak RSS (GB) | size (GB) | cos mean | cos min | max-abs | near-tie texts "
            "(tokens) | all texts: cos min |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name in ("latency", "failures"):
            continue
        p = r.get("parity", {})
        nt = p.get("near_tie") or {}
        allt = p.get("all_texts", {})
        res = "built" if r["returncode"] == 0 else f"refused (exit {r['returncode']})"
        fmt = lambda v, f: (format(v, f) if isinstance(v, (int, float)) else "–")  # noqa: E731
        rows.append(f"| {name} | {res} | {r['seconds']:.0f} | {r['peak_rss_mb'] / 1024:.1f} | "
                    f"{r['size_bytes'] / 1e9:.2f} | {fmt(p.get('cos_mean'), '.7f')} | {fmt(p.get('cos_min'), '.7f')} | "
                    f"{fmt(p.get('max_abs'), '.1e')} | "
                    f"{(str(nt.get('texts')) + ' / ' + str(nt.get('rows')) + ' (' + str(nt.get('tokens')) + ')') if nt else '–'}"
                    f" | {fmt(allt.get('cos_min'), '.4f')} |")
    lat = results.get("latency", {}).get("latency")
    if lat:
        rows += ["", "| model | routing | b1 real (ms) | b1 fixed 128 | b32 real (ms) | b32 fixed 128 | x b1 real / fixed | "
                     "x b32 real / fixed | peak RSS (GB) |", "|---|---|---|---|---|---|---|---|---|"]
        for x in lat:
            fx, v = x.get("fixed") or {}, x.get("vs_pytorch") or {}
            g = lambda d, b: d.get(f"batch={b}", {}).get("p50_ms", float("nan"))  # noqa: E731
            rat = lambda b: "{:.2f} / {:.2f}".format(*(v.get(k, {}).get("threads=1", {}).get(f"batch={b}", float("nan"))  # noqa: E731
                                                       for k in ("latency", "latency_fixed")))
            rows.append(f"| {x['name']} | {x.get('routing') or ('–' if x.get('target') else 'PyTorch fp32')} | "
                        f"{g(x['real'], 1):.1f} | {g(fx, 1):.1f} | {g(x['real'], 32):.0f} | {g(fx, 32):.0f} | {rat(1)} | "
                        f"{rat(32)} | {(x.get('peak_rss_mb') or 0) / 1024:.1f} |")
    fails = results.get("failures", {}).get("checks")
    if fails:
        rows += ["", "| failure at full shape | exit | one line, no traceback | output / temp left | message |",
                 "|---|---|---|---|---|"]
        for k, c in fails.items():
            rows.append(f"| {k} | {c['returncode']} | {'yes' if not c['traceback'] else 'NO'} | "
                        f"{'none' if not (c['output_exists'] or c['left_behind']) else 'LEFT: ' + ', '.join(c['left_behind'])} | "
                        f"`{c['last_line'][:160]}` |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "full-shape")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from: {', '.join(PATHS)}")
    ap.add_argument("--redo", action="store_true", help="measure paths already in results.json again")
    ap.add_argument("--markdown", action="store_true", help="print the table of OUT/results.json and exit")
    ap.add_argument("--_write", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._write:
        write_checkpoint(args._write)
        return 0
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if args.markdown:
        print(markdown(results))
        return 0
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        ap.error(f"unknown path(s) {', '.join(unknown)}; known: {', '.join(PATHS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint"
    if not (ckpt / "model.safetensors").exists() or "checkpoint" not in results:
        r = run_measured([sys.executable, __file__, "--_write", str(ckpt)], args.out / "checkpoint.log")
        if r["returncode"] != 0:
            print(f"writing the checkpoint failed: {r['last_line']}", file=sys.stderr)
            return 1
        results["checkpoint"] = {**r, "size_bytes": tree_bytes(ckpt)}
        results_file.write_text(json.dumps(results, indent=2) + "\n")
    print(f"checkpoint {ckpt}: {results['checkpoint']['seconds']} s, {results['checkpoint']['peak_rss_mb']} MB peak",
          flush=True)
    for name in paths:
        if name in results and not args.redo:
            print(f"{name}: already measured (--redo to measure again)")
            continue
        dest = args.out / name
        if name in ("latency", "failures"):
            print(f"{name} ...", flush=True)
            r = (bench_latency if name == "latency" else failures)(args.out, ckpt)
            results[name] = r
            results_file.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{name}: exit {r['returncode']} in {r['seconds']} s; {r['last_line'][-300:]}", flush=True)
            continue
        flag = "--model" if PATHS[name][0] == "compile" else "--teacher"
        cmd = MOE2EDGE + PATHS[name] + [flag, str(ckpt), "--out", str(dest), "--force"]
        print(f"{name}: {shlex.join(cmd[2:])} ...", flush=True)
        r = run_measured(cmd, args.out / f"{name}.log")
        r["size_bytes"] = tree_bytes(dest) if r["returncode"] == 0 else 0
        if r["returncode"] == 0 and (dest / "manifest.json").exists():
            r["parity"] = engine_record(dest)
        results[name] = r
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name}: exit {r['returncode']} in {r['seconds']} s, peak {r['peak_rss_mb']} MB, "
              f"{r['size_bytes'] / 1e9:.2f} GB; {r['last_line'][-200:]}", flush=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
