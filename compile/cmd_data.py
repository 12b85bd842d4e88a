"""`moe2edge data`: fetch Debian's package lists and build real training pairs + a retrieval benchmark."""

from __future__ import annotations

from pathlib import Path

from moe2edge.compile._args import nonneg_int, open_fraction, positive_int

DEFAULT_OUT = ".cache/moe2edge/debian-bookworm"


def register(sub) -> None:
    p = sub.add_parser(
        "data",
        help="build real multilingual text (Debian descriptions): training pairs + BEIR benchmark",
        description="Real text, offline after one fetch: Debian's package descriptions (English + DDTP "
        "translations) as query=short line / document=long text pairs, split by source package and "
        "near-duplicate group, with a leakage check.",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = dsub.add_parser(
        "build",
        help="fetch the lists (apt, private dir) and build pairs + benchmark",
        description="Fetch bookworm main amd64 Packages + Translation-* with apt-get into a PRIVATE lists "
        "dir (system lists untouched), then write OUT/train/pairs.jsonl, a BEIR benchmark "
        "(corpus/queries .jsonl.gz, qrels/test.tsv, manifest.json) and OUT/manifest.json. Same lists -> "
        "byte-identical files.",
    )
    b.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    b.add_argument("--lists", default=None,
                   help="use this already-fetched lists dir instead of fetching (default: fetch into OUT/lists)")
    b.add_argument("--benchmark-out", default=None,
                   help="where to write the benchmark (default: OUT/benchmark); e.g. benchmarks/debian-bookworm-v1")
    b.add_argument("--suite", default="bookworm", help="Debian suite; one only (default: bookworm)")
    b.add_argument("--seed", type=int, default=13)
    b.add_argument("--test-fraction", type=open_fraction, default=0.10,
                   help="fraction of groups held out, in (0, 1) (default 0.10)")
    b.add_argument("--max-train-per-lang", type=nonneg_int, default=5000,
                   help="training pairs per non-English language and kind (mono/cross) (default 5000)")
    b.add_argument("--max-train-en", type=nonneg_int, default=30000, help="English training pairs (default 30000)")
    b.set_defaults(func=run)
    f = dsub.add_parser(
        "fixture",
        help="cut a small lists dir (for tests) out of a full one",
        description="Write a small, gzipped subset of a lists dir (Packages + Translation-en/de/fr/ja and a "
        "Release with their sha256) for offline tests; e.g. tests/fixtures/debian-lists.",
    )
    f.add_argument("--lists", required=True, help="full lists dir (from `moe2edge data build`)")
    f.add_argument("--out", required=True, help="fixture folder to write")
    f.add_argument("--sources", type=positive_int, default=24, help="number of source packages to keep (default 24)")
    f.set_defaults(func=run_fixture)


def run(args) -> int:
    import logging

    from moe2edge.data.debian import BuildConfig, build_debian, fetch_lists

    from moe2edge._io import input_dir, output_folder

    log = logging.getLogger("moe2edge.data")
    out = Path(args.out)
    output_folder(out, inputs=[args.lists])  # before the fetch
    if args.benchmark_out:
        output_folder(args.benchmark_out, inputs=[args.lists], flag="--benchmark-out")
    if args.lists:
        input_dir(args.lists, "--lists folder (from `moe2edge data build`)")
    lists = Path(args.lists) if args.lists else fetch_lists(out / "lists", suite=args.suite)
    cfg = BuildConfig(suite=args.suite, seed=args.seed, test_fraction=args.test_fraction,
                      max_train_per_lang=args.max_train_per_lang, max_train_en=args.max_train_en)
    m = build_debian(lists_dir=lists, out_dir=out, benchmark_dir=args.benchmark_out, cfg=cfg)
    log.debug("manifest: %s", m)
    leak = m["leakage"]
    bench = Path(args.benchmark_out) if args.benchmark_out else out / "benchmark"
    print(f"lists: {m['lists']['release'].get('Codename', args.suite)} {m['lists']['release'].get('Version', '')} "
          f"({m['lists']['release'].get('Date', '?')}), {len(m['lists']['files'])} files, sha256 verified: "
          f"{all(f['verified_against_release'] for f in m['lists']['files'])}")
    s = m["stats"]
    print(f"units: {s['units_total']} descriptions, {s['units_kept']} kept, {s['groups']} groups, "
          f"{s['test_groups']} test groups")
    print(f"leakage check: {leak['test_units_leaking']} of {leak['test_units']} test units share a source, "
          f"normalised text or near-duplicate key with {leak['train_units']} train units "
          f"(source {leak['test_units_sharing_source_with_train']}, long text "
          f"{leak['test_units_with_normalised_long_text_in_train']}, short text "
          f"{leak['test_units_with_normalised_short_text_in_train']}, minhash band "
          f"{leak['test_units_with_minhash_band_in_train']})")
    print(f"benchmark -> {bench}: {m['benchmark']['corpus_docs']} docs, queries per language: "
          + ", ".join(f"{k} {v}" for k, v in m["benchmark"]["queries_per_language"].items()))
    per_lang: dict[str, int] = {}
    for k, v in m["train"]["pairs_per_language_kind"].items():
        per_lang[k.split("/")[0]] = per_lang.get(k.split("/")[0], 0) + v
    print(f"train pairs -> {out / 'train' / 'pairs.jsonl'}: {m['train']['pairs']} ("
          + ", ".join(f"{k} {v}" for k, v in per_lang.items()) + ")")
    return 0


def run_fixture(args) -> int:
    from moe2edge._io import input_dir, output_folder
    from moe2edge.data.debian import make_fixture_lists

    input_dir(args.lists, "--lists folder")
    output_folder(args.out, inputs=[args.lists])
    files = make_fixture_lists(args.lists, args.out, n_sources=args.sources)
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files ({total / 1024:.1f} KiB) to {args.out}")
    return 0
