"""The edge runtime in a venv WITHOUT torch: only numpy + tokenizers + onnxruntime + moe2edge (--no-deps).

`make test` builds that venv (.venv-runtime, see the Makefile) and points MOE2EDGE_RUNTIME_VENV at it;
by hand:

    python3 -m venv /tmp/rtvenv
    /tmp/rtvenv/bin/pip install numpy==2.4.6 tokenizers==0.22.2 onnxruntime==1.32.0
    /tmp/rtvenv/bin/pip install --no-deps .
    MOE2EDGE_RUNTIME_VENV=/tmp/rtvenv pytest -m slow tests/test_runtime_venv.py
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.test_targets import onnx_fp32, pairs, small_moe  # noqa: F401 - fixtures


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MOE2EDGE_RUNTIME_VENV"),
                    reason="set MOE2EDGE_RUNTIME_VENV to a venv with only numpy, tokenizers, onnxruntime, moe2edge --no-deps")
def test_engine_runs_without_torch(onnx_fp32):  # noqa: F811
    venv = os.environ["MOE2EDGE_RUNTIME_VENV"]
    py = Path(venv).resolve() / "bin" / "python"
    code = ("import importlib.util, sys\nassert importlib.util.find_spec('torch') is None, 'torch is installed'\n"
            "from moe2edge.targets.runtime import load_engine\n"
            f"e = load_engine({str(onnx_fp32[1])!r})\n"
            "x = e.encode(['find files by name', 'a web browser'], prompt='search_query')\n"
            "assert x.shape == (2, 384)\nprint('ok')")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
