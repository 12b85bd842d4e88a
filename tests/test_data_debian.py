"""Debian corpus builder on the frozen fixture lists (no apt in tests) and the frozen benchmark."""

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from moe2edge.data.debian import (
    BuildConfig, Unit, apt_command, build_debian, group_units, iter_stanzas, leakage_check, read_lists,
    split_description, split_units, unit_keys,
)
from moe2edge.data.readers import load_beir, read_pairs

FIXTURE = Path(__file__).parent / "fixtures" / "debian-lists"
FROZEN = Path(__file__).parents[1] / "benchmarks" / "debian-bookworm-v1"
CFG = BuildConfig(test_fraction=0.4, min_queries_per_lang=1)


def test_split_description_policy():
    value = "short line\n first para\n wraps here.\n .\n second para:\n  * verbatim item\n  * another"
    assert split_description(value) == ("short line", "first para wraps here.\nsecond para:\n* verbatim item\n* another")
    st = list(iter_stanzas("Package: a\nDescription: x\n y\n\nPackage: b\n"))
    assert st == [{"Package": "a", "Description": "x\n y"}, {"Package": "b"}]


def test_apt_command_uses_private_dirs(tmp_path):
    cmd, sources = apt_command(tmp_path / "lists")
    joined = " ".join(cmd)
    assert f"Dir::State::Lists={tmp_path / 'lists'}" in joined and "/var/lib/apt" not in joined
    assert "Dir::Etc::SourceParts=/nonexistent" in joined and "Acquire::Languages=en," in joined
    assert sources.strip().endswith("bookworm main")


def test_read_fixture_lists_verifies_sha256():
    units, manifest = read_lists(FIXTURE)
    assert manifest["release"]["Codename"] == "bookworm" and manifest["release"]["Date"]
    assert all(f["verified_against_release"] for f in manifest["files"])
    assert len(units) == 39
    u = next(u for u in units.values() if "aspell-et" in u.packages)
    assert u.sources == ["ispell-et"] and u.long and {"de", "fr"} <= set(u.translations)


def test_sha_mismatch_and_mixed_suites_rejected(tmp_path):
    d = tmp_path / "lists"
    shutil.copytree(FIXTURE, d)
    en = next(d.glob("*Translation-en.gz"))
    en.write_bytes(gzip.compress(gzip.decompress(en.read_bytes()) + b"\n"))
    with pytest.raises(ValueError, match="does not match"):
        read_lists(d)
    shutil.copy(next(FIXTURE.glob("*Translation-en.gz")), en)
    (d / "fixture_debian_dists_trixie_main_i18n_Translation-en").write_text("")
    with pytest.raises(ValueError, match="several suites"):
        read_lists(d)


def test_build_is_deterministic_and_leak_free(tmp_path):
    m1 = build_debian(lists_dir=FIXTURE, out_dir=tmp_path / "a", cfg=CFG)
    m2 = build_debian(lists_dir=FIXTURE, out_dir=tmp_path / "b", cfg=CFG)
    for rel in ("benchmark/corpus.jsonl.gz", "benchmark/queries.jsonl.gz", "benchmark/qrels/test.tsv",
                "train/pairs.jsonl", "manifest.json"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert m1 == m2
    assert m1["leakage"]["test_units_leaking"] == 0 and m1["leakage"]["test_units"] > 0
    ds = load_beir(tmp_path / "a" / "benchmark")
    assert len(ds.corpus) == m1["benchmark"]["corpus_docs"] > 0
    assert set(ds.languages.values()) == set(m1["benchmark"]["queries_per_language"]) >= {"en", "de", "fr"}
    assert all(len(r) == 1 and next(iter(r)) in ds.corpus for r in ds.qrels.values())
    # no benchmark document's text (normalised) is a training positive
    pairs = read_pairs(tmp_path / "a" / "train" / "pairs.jsonl")
    assert {p.language for p in pairs} >= {"en", "de", "fr", "ja"}
    train_texts = {p.positive for p in pairs}
    assert not train_texts & {d["text"] for d in ds.corpus.values()}


def test_near_duplicates_grouped_and_never_split():
    units, _ = read_lists(FIXTURE)
    train, test, groups, _ = split_units(units, CFG)
    rust = [u for u in units.values() if any(p.startswith("librust-") for p in u.packages)]
    assert len(rust) == 3 and len({groups[u.md5] for u in rust}) == 1  # templated crates: one group
    train_groups = {groups[u.md5] for u in train}
    assert not train_groups & {groups[u.md5] for u in test}


def test_leakage_check_catches_a_leak():
    a = Unit(md5="a", short="tool for x", long="a b c d e f g h i j k l m n", packages=["pa"], sources=["sa"])
    b = Unit(md5="b", short="other", long="a b c d e f g h i j k l m n o", packages=["pb"], sources=["sb"])
    c = Unit(md5="c", short="third", long="completely different words entirely here", packages=["pc"], sources=["sc"])
    assert group_units([a, b, c], unit_keys([a, b, c], CFG)) == [0, 0, 2]  # a, b near-duplicates
    leak = leakage_check([a], [b, c], CFG)
    assert leak["test_units_leaking"] == 1 and leak["test_units_with_minhash_band_in_train"] == 1


def test_frozen_benchmark_matches_its_manifest():
    m = json.loads((FROZEN / "manifest.json").read_text())
    for rel, sha in m["benchmark"]["files"].items():
        assert hashlib.sha256((FROZEN / rel).read_bytes()).hexdigest() == sha, rel
    assert m["leakage"]["test_units_leaking"] == 0
    assert m["lists"]["release"]["Codename"] == "bookworm"
    assert all(f["verified_against_release"] for f in m["lists"]["files"])
    ds = load_beir(FROZEN)
    assert len(ds.corpus) == m["benchmark"]["corpus_docs"]
    langs = {}
    for q in ds.queries:
        langs[ds.languages[q]] = langs.get(ds.languages[q], 0) + 1
    assert langs == m["benchmark"]["queries_per_language"] and langs["en"] == 1000


def test_cli_data_build_prints_counts_and_leakage(tmp_path, capsys):
    import argparse

    from moe2edge.compile import cmd_data

    p = argparse.ArgumentParser()
    cmd_data.register(p.add_subparsers())
    args = p.parse_args(["data", "build", "--lists", str(FIXTURE), "--out", str(tmp_path), "--test-fraction", "0.4"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "sha256 verified: True" in out and "leakage check: 0 of" in out
    assert "queries per language: en " in out and "train pairs ->" in out
    assert (tmp_path / "benchmark" / "manifest.json").is_file() and (tmp_path / "train" / "pairs.jsonl").is_file()
