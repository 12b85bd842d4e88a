"""Verification refuses a wrong engine: mutated graphs, the gates, text-set overlap, the probe gate.

Each mutation below edits the exported ONNX graph the way a buggy exporter or runtime could (an
expert's up-projection paired with another's down-projection, tanh-approximate GELU, the shared
expert bias dropped, top-k weights renormalised) and must make ``compile_engine`` refuse the engine
with a message naming the measured numbers and thresholds, writing nothing. The fixture's experts are
distinct and its router really routes (``tests/test_targets.check_routing``); on the plain upcycled
model (identical experts, near-uniform router) the expert swap is invisible -- shown below.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from moe2edge import targets  # noqa: E402
from moe2edge.targets.base import CompileConfig  # noqa: E402
from tests.test_targets import (  # noqa: E402,F401
    FIXTURE_STATUS, _compile, _small_moe, cached_export, onnx_fp32, pairs, small_moe,
)

MOE_LAYER = "model.encoder.layers.1.mlp"


# ------------------------------------------------------------------------------ graph mutations


def _init(g, name):
    return next(i for i in g.graph.initializer if i.name == name)


def swap_expert_up_projections(g):
    """Expert 0's fc1 <-> expert 1's fc1: each now runs with the other's down-projection."""
    a, b = _init(g, f"{MOE_LAYER}.fc1.0"), _init(g, f"{MOE_LAYER}.fc1.1")
    ta, tb = onnx.numpy_helper.to_array(a).copy(), onnx.numpy_helper.to_array(b).copy()
    a.CopyFrom(onnx.numpy_helper.from_array(tb, a.name))
    b.CopyFrom(onnx.numpy_helper.from_array(ta, b.name))


def tanh_gelu(g):
    gelus = [n for n in g.graph.node if n.op_type == "Gelu"]
    assert gelus
    for n in gelus:
        for a in n.attribute:
            if a.name == "approximate":
                a.s = b"tanh"


def drop_shared_expert_bias(g):
    b = _init(g, f"{MOE_LAYER}.bias")
    b.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(b)), b.name))


def renormalise_top_k(g):
    """weights = topk_values / sum(topk_values): what the spec says NOT to do (top-2 without renormalisation)."""
    topk = next(n for n in g.graph.node if n.op_type == "TopK")
    vals = topk.output[0]
    users = [n for n in g.graph.node if vals in n.input]
    axes = onnx.numpy_helper.from_array(np.array([-1], np.int64), "mut_axes")
    g.graph.initializer.append(axes)
    nodes = [onnx.helper.make_node("ReduceSum", [vals, "mut_axes"], ["mut_sum"], keepdims=1),
             onnx.helper.make_node("Div", [vals, "mut_sum"], ["mut_renorm"])]
    for n in users:
        for i, x in enumerate(n.input):
            if x == vals:
                n.input[i] = "mut_renorm"
    pos = list(g.graph.node).index(topk) + 1
    for k, n in enumerate(nodes):
        g.graph.node.insert(pos + k, n)


MUTATIONS = {"swap-experts": swap_expert_up_projections, "tanh-gelu": tanh_gelu,
             "drop-shared-bias": drop_shared_expert_bias, "renormalise-top-k": renormalise_top_k}


def _mutated_export(monkeypatch, base: Path, mutate, tmp: Path):
    """export_onnx -> a copy of ``base`` (the fixture's real export) with ``mutate`` applied."""
    from moe2edge.targets import torch_export

    g = onnx.load(str(base))
    mutate(g)
    onnx.checker.check_model(g)
    src = tmp / "mutated.onnx"
    onnx.save(g, str(src))

    def fake_export(model, sample, path, *, dim=None, all_experts=False, opset=20):
        shutil.copyfile(src, path)
        return Path(path)

    monkeypatch.setattr(torch_export, "export_onnx", fake_export)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's folder redirected, so a test can see that a failed compile leaves no build folder."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutated_graph_is_refused_with_the_numbers(mutation, small_moe, pairs, onnx_fp32, tmp_path, monkeypatch,
                                                   private_tmp):
    model, ckpt = small_moe
    work = tmp_path / "work"
    work.mkdir()
    _mutated_export(monkeypatch, onnx_fp32[1] / "model.onnx", MUTATIONS[mutation], work)
    out = tmp_path / "engines" / "bad"
    out.parent.mkdir()
    with pytest.raises(targets.VerificationError) as ei:
        _compile(model, ckpt, out, CompileConfig(target="onnx"), pairs[0])
    msg, par = str(ei.value), ei.value.parity
    print(f"\n{mutation}: {msg}")
    # the message names measured value and threshold; max-abs (1e-5) catches every one of them
    assert f"max-abs {par['max_abs']:.3g} > 1e-05" in msg, msg
    assert par["max_abs"] > 1e-5 and par["thresholds"] == {"cos_min": 0.99999, "sqnr_db": None, "max_abs": 1e-5,
                                                           "ndcg_rel_loss": 0.005}
    if mutation == "tanh-gelu":  # small per coordinate: only max-abs sees it (cosine passes even 0.99999)
        assert 1e-5 < par["max_abs"] < 1e-2 and par["cos_min"] >= 0.99999 and "cosine" not in msg
    else:  # routing mutations move whole expert outputs: even the old cosine gate (0.9999) sees them
        assert par["cos_min"] < 0.9999 and f"cosine min {par['cos_min']:.7f} < 0.99999" in msg
    assert not out.exists() and os.listdir(out.parent) == []  # nothing at --out, no temp sibling
    assert os.listdir(private_tmp) == []  # no build folder left in the temp dir


def test_identical_experts_hide_an_expert_swap(pairs, tmp_path_factory, tmp_path, monkeypatch):
    """Why the fixture matters: on the plain upcycled model (experts = copies) the same swap changes
    nothing, so the engine verifies -- a parity test on that model cannot catch mis-routed experts."""
    from moe2edge.targets.base import Sample
    from moe2edge.targets.runtime import Tokenizer
    from moe2edge.targets.torch_export import export_onnx

    model, ckpt = _small_moe(tmp_path_factory, distinct=False)
    tok = Tokenizer(ckpt / "tokenizer.json", max_length=64, pad_id=0)
    base = export_onnx(model, Sample(*tok(["a sample sentence for tracing the graph", "two"])[:2]), tmp_path / "b.onnx")
    _mutated_export(monkeypatch, base, swap_expert_up_projections, tmp_path)
    man = _compile(model, ckpt, tmp_path / "out", CompileConfig(target="onnx"), pairs[0])
    assert man["parity"]["max_abs"] <= 1e-5  # the swapped engine passes every gate


# ------------------------------------------------------------------------------ gates


def test_gates_name_value_and_threshold():
    from moe2edge.targets.gates import cos_to_db, gate_problems, probe_gate, sqnr_db, thresholds

    cfg = CompileConfig(precision="int8")
    thr = thresholds(cfg)
    ok = {"finite": True, "cos_min": 0.995, "cos_mean": 0.998, "max_abs": 0.3, "sqnr_db": 24.0,
          "ndcg@10_rel_loss": 0.001, "ndcg@10_pytorch": 0.9, "ndcg@10_engine": 0.899}
    assert gate_problems(ok, thr) == []  # max-abs is not an INT8 gate
    bad = {**ok, "cos_min": 0.98, "sqnr_db": 18.5, "ndcg@10_rel_loss": 0.01, "ndcg@10_engine": 0.891}
    msgs = gate_problems(bad, thr)
    assert msgs[0].startswith("cosine min 0.9800000 < 0.99") and msgs[1] == "SQNR 18.50 dB < 20.0 dB"
    assert "nDCG@10 loss 1.00% of PyTorch's 0.9000 (engine 0.8910) > 0.5%" in msgs[2]
    assert gate_problems({**ok, "finite": False}, thr) == ["non-finite embeddings"]
    fp = thresholds(CompileConfig())
    assert gate_problems({**ok, "cos_min": 0.999995, "max_abs": 3e-5}, fp) == ["max-abs 3e-05 > 1e-05"]
    # SQNR: 20 log10(||ref|| / ||ref - got||) over the set; unit rows at cosine c give -10 log10(2 (1 - c))
    g = np.random.default_rng(0)
    ref = g.standard_normal((50, 16))
    assert sqnr_db(ref, ref + 0.1 * ref) == pytest.approx(20.0) and sqnr_db(ref, ref) == float("inf")
    assert cos_to_db(0.99) == pytest.approx(16.99, abs=0.01) and cos_to_db(0.995) == pytest.approx(20.0)
    # probe gate: passes with room, fails when the halves disagree by more than the room
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    noise = g.standard_normal(ref.shape)
    near = ref + 0.01 * noise
    assert probe_gate(ref, near, 25, cos_min=0.99, sqnr=20.0)["passed"]
    lopsided = near.copy()
    lopsided[:25] = ref[:25] + 0.09 * noise[:25]  # half A much worse than half B
    rep = probe_gate(ref, lopsided, 25, cos_min=0.99, sqnr=20.0)
    assert not rep["passed"] and rep["margin_sqnr_db"] > 10 and rep["score_db"] < 0


def test_tighter_fp32_gate_refuses_what_the_old_one_passed(small_moe, pairs, onnx_fp32, tmp_path, monkeypatch):
    """tanh-GELU under the old gate (cosine min >= 0.9999 alone) builds; under today's it does not."""
    model, ckpt = small_moe
    _mutated_export(monkeypatch, onnx_fp32[1] / "model.onnx", tanh_gelu, tmp_path)
    old = CompileConfig(target="onnx", fp32_cos_min=0.9999, fp32_max_abs=None, max_ndcg_rel_loss=None)
    man = _compile(model, ckpt, tmp_path / "old", old, pairs[0])
    assert man["parity"]["cos_min"] >= 0.9999 and man["parity"]["max_abs"] > 1e-5  # today's gate: see above


# ------------------------------------------------------------------------------ text sets


def test_text_sets_are_disjoint_by_source_package():
    from moe2edge.data.installed import installed_text_sets, read_descriptions
    from moe2edge.data.textsets import leakage, overlap

    rows = read_descriptions(FIXTURE_STATUS)
    assert len(rows) >= 300 and len({d.source for d in rows}) < len(rows)  # siblings exist
    sets, rep = installed_text_sets(FIXTURE_STATUS)
    assert set(sets) == {"verify", "calibration", "probe"} and sum(rep["sizes"].values()) == len(rows)
    assert not any(rep["leakage"].values())
    src = {r: {d.source for d in v} for r, v in sets.items()}
    assert not (src["verify"] & src["calibration"]) and not (src["verify"] & src["probe"])
    assert not (src["calibration"] & src["probe"])
    # the old way (even / odd rows of the sorted list) shares sources and near-duplicates: the check sees it
    old = {"verify": rows[0::2], "calibration": rows[1::2]}
    assert leakage(old)["verify->calibration"] > 20
    texts = [d.long for d in rows]
    ov = overlap(texts[:100], texts[50:150] + [texts[0].upper() + " "])
    assert ov["texts"] == 101 and ov["exact"] == 51
    long = max(texts[:100], key=len)
    assert overlap(texts[:100], [long + " Extra words at the end."]) == {"texts": 1, "exact": 0, "near_duplicate": 1}
    assert overlap(texts[:100], ["a text about something else entirely, written for this test"])["near_duplicate"] == 0


def test_overlapping_user_sets_are_refused_or_recorded(small_moe, pairs, tmp_path, monkeypatch):
    """A calibration file that repeats verification texts: refused with counts (nothing written), or
    compiled with --allow-overlap and the counts in the manifest."""
    import json

    from moe2edge.compile.cli import main
    from moe2edge.targets import build

    model, ckpt = small_moe
    verify, calib, _ = pairs
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in verify))
    leaky = calib + [d for _, d in verify[:5]] + [verify[5][1] + " (near copy)"]
    (tmp_path / "c.txt").write_text("\n".join(t.replace("\n", " ") for t in leaky))
    monkeypatch.setattr(build, "verify_engine", lambda *a, **k: {"n": 0, "cos_mean": 1, "cos_min": 1, "max_abs": 0,
                                                                  "sqnr_db": 99, "ndcg@10_engine": 1,
                                                                  "ndcg@10_pytorch": 1, "ndcg@10_delta": 0})
    args = ["compile", "--model", str(ckpt), "--target", "onnx", "--int8", "--calibration", str(tmp_path / "c.txt"),
            "--verify-file", str(tmp_path / "v.jsonl"), "--out", str(tmp_path / "e")]
    with pytest.raises(build.TextOverlapError, match=r"calibration vs verification: 5 exact \+ 1 near-duplicate of 48"):
        build.text_sets(verify, leaky, pairs[2], allow_overlap=False)
    assert main(args) == 2 and not (tmp_path / "e").exists()
    assert main(args + ["--allow-overlap"]) == 0
    man = json.loads((tmp_path / "e" / "manifest.json").read_text())
    ts = man["identity"]["text_sets"]
    assert ts["allow_overlap"] and ts["overlap"]["calibration_vs_verification"]["exact"] >= 4


# ------------------------------------------------------------------------------ error messages


def test_every_named_extra_exists():
    """Each ``extra=`` / ``runtime_extra`` in the source names an extra of pyproject.toml (there is no
    [core] or [tensorrt]); extra=None messages say what to install instead."""
    import re
    import tomllib

    from moe2edge._optional import MissingExtraError, require

    root = Path(__file__).resolve().parents[1]
    extras = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {}
    for f in root.glob("*/*.py"):
        if f.parts[-2] in (".venv", ".venv-runtime", "tests", "bench"):
            continue
        for m in re.finditer(r'(?:extra=|runtime_extra = )"([^"]+)"', f.read_text(encoding="utf-8")):
            named.setdefault(m.group(1), []).append(f.name)
    assert named and set(named) <= extras, {k: v for k, v in named.items() if k not in extras}
    with pytest.raises(MissingExtraError, match=r"not installed: install NVIDIA TensorRT"):
        require("no_such_module_xyz", extra=None, hint="install NVIDIA TensorRT >= 10")
    with pytest.raises(MissingExtraError, match=r"pip install 'moe2edge\[onnx\]'"):
        require("no_such_module_xyz", extra="onnx")


# ------------------------------------------------------------------------------ TensorRT plans


@pytest.fixture(scope="module")
def trt_folder(small_moe, pairs, tmp_path_factory):
    model, ckpt = small_moe
    out = tmp_path_factory.mktemp("trt") / "trt-int8"
    man = _compile(model, ckpt, out, CompileConfig(target="tensorrt", precision="int8"), *pairs)
    return man, out


def _copy(folder, tmp_path):
    dst = tmp_path / "eng"
    shutil.copytree(folder, dst)
    return dst


def test_tensorrt_folder_bundles_plan_verification_inputs(trt_folder):
    import json

    man, out = trt_folder
    z = np.load(out / "plan_verification.npz")
    assert int(z["batches"]) >= 2 and z["torch_ref"].shape == z["qdq_ref"].shape and z["torch_ref"].shape[1] == 384
    assert json.loads(str(z["thresholds"]))["sqnr_db"] == 20.0
    assert "plan_verification.npz" in man["identity"]["files"]  # hashed with the rest of the compile
    sh = (out / "build_engine.sh").read_text()
    assert "exec python3 build_engine.py" in sh and "#   trtexec --onnx=model_qdq.onnx" in sh
    src = (out / "build_engine.py").read_text()
    compile(src, "build_engine.py", "exec")
    assert "clear_flag(trt.BuilderFlag.TF32)" in src and "build_and_verify" in src


def _runners(folder, wrong: set):
    """open_runner: ONNX Runtime plays the plan (the QDQ graph); precisions in ``wrong`` return noise-perturbed
    embeddings (a plan whose fp16 float sub-layers broke parity)."""
    from moe2edge.targets.runtime import OrtEngine

    ort = OrtEngine(folder / "model_qdq.onnx")

    def open_runner(plan_path):
        prec = Path(plan_path).read_bytes().decode()
        if prec not in wrong:
            return ort.run
        rng = np.random.default_rng(0)

        def bad(ids, mask):
            x = ort.run(ids, mask) + 0.05 * rng.standard_normal((len(ids), 384)).astype(np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True)
        return bad
    return open_runner


def test_plan_fp16_refused_fp32_kept_and_recorded(trt_folder, tmp_path):
    import json

    from moe2edge.targets.plan_check import build_and_verify, check_plan_record

    folder = _copy(trt_folder[1], tmp_path)
    ident = json.loads((folder / "manifest.json").read_text())["identity_sha256"]
    rec = build_and_verify(folder, build=lambda prec: prec.encode(), open_runner=_runners(folder, {"fp16"}))
    assert rec["passed"] and rec["float_precision"] == "fp32" and (folder / "engine.plan").read_bytes() == b"fp32"
    fp16 = rec["attempts"][0]
    assert fp16["float_precision"] == "fp16" and not fp16["passed"]
    assert any(p.startswith("SQNR") or p.startswith("cosine min") for p in fp16["problems"]), fp16["problems"]
    assert rec["verification"]["vs_qdq_onnx"]["max_abs"] == 0.0  # ORT played the QDQ graph itself
    man = json.loads((folder / "manifest.json").read_text())
    assert man["tensorrt_plan"]["plan_sha256"] == rec["plan_sha256"] and man["identity_sha256"] == ident
    assert check_plan_record(folder, folder / "engine.plan")["float_precision"] == "fp32"
    assert not list(folder.glob(".tmp-*"))


def test_plan_that_fails_everywhere_is_not_left(trt_folder, tmp_path):
    import json

    from moe2edge.targets.plan_check import PlanVerificationError, build_and_verify

    folder = _copy(trt_folder[1], tmp_path)
    with pytest.raises(PlanVerificationError, match=r"fp16: .*; fp32: .*no engine.plan written") as ei:
        build_and_verify(folder, build=lambda prec: prec.encode(), open_runner=_runners(folder, {"fp16", "fp32"}))
    assert len(ei.value.attempts) == 2 and not (folder / "engine.plan").exists() and not list(folder.glob(".tmp-*"))
    assert json.loads((folder / "manifest.json").read_text())["tensorrt_plan"]["passed"] is False


def test_runtime_refuses_a_plan_without_a_passing_record(trt_folder, tmp_path, monkeypatch):
    from moe2edge.targets import runtime
    from moe2edge.targets.plan_check import build_and_verify

    folder = _copy(trt_folder[1], tmp_path)
    (folder / "engine.plan").write_bytes(b"a plan built by hand with trtexec")
    monkeypatch.setattr("moe2edge._optional.has", lambda m: True)  # pretend tensorrt is installed
    opened = []
    monkeypatch.setattr(runtime, "TensorRTEngine", lambda plan, **kw: opened.append(plan) or object())
    with pytest.raises(runtime.EngineFolderError, match=r"no passing verification record.*build_engine.py"):
        runtime.load_engine(folder)
    build_and_verify(folder, build=lambda prec: prec.encode(), open_runner=_runners(folder, set()))
    runtime.load_engine(folder)  # verified: opened
    assert opened == [folder / "engine.plan"]
    (folder / "engine.plan").write_bytes(b"fp16 swapped after verification")
    with pytest.raises(runtime.EngineFolderError, match="sha256 differs"):
        runtime.load_engine(folder)


def test_build_engine_script_wires_build_and_verify(trt_folder, tmp_path, monkeypatch):
    """The generated build_engine.py, with a stand-in ``tensorrt`` module: main() builds, verifies, keeps."""
    import importlib.util
    import sys
    import types

    from moe2edge.targets import runtime

    folder = _copy(trt_folder[1], tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="stand-in"))
    spec = importlib.util.spec_from_file_location("build_engine", folder / "build_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "build", lambda prec: prec.encode())
    ort_run = _runners(folder, {"fp16"})
    monkeypatch.setattr(runtime, "TensorRTEngine", lambda p: types.SimpleNamespace(run=ort_run(p)))
    mod.main()
    assert (folder / "engine.plan").read_bytes() == b"fp32"
