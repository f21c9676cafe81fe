"""The evaluation subcommands: `ppl`, `bench`, `matrix`, `report` (registered by pyharness.cli).

Only the standard library is imported at module level; each handler imports what it needs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyharness.matrix import MatrixResult

DB_HELP = "results database (default: $PYHARNESS_DB, else results/results.sqlite under the project root)"


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip() != "")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from exc


def _csv_strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _open_store(db: str | None) -> Any:
    from pyharness.store import Store

    return Store(Path(db) if db else None)


def _context(args: argparse.Namespace) -> Any:
    from pyharness.build import load_build
    from pyharness.runners import RunContext, resolve_model

    build = load_build(args.variant, args.backend)
    model = resolve_model(args.model)
    return RunContext(build=build, model=model, timeout_s=args.timeout, echo=args.verbose)


def _finish(record: Any, args: argparse.Namespace) -> int:
    """Store the record (unless --no-store) and say what happened."""
    run_id = None
    if not args.no_store:
        with _open_store(args.db) as store:
            run_id = store.record(record)
            where = f" (run {run_id} in {store.path})"
    else:
        where = " (not stored)"
    if record.ok:
        print(f"ok{where}", file=sys.stderr)
        return 0
    print(f"FAILED{where}: {record.fields.get('error')}", file=sys.stderr)
    tail = [ln for ln in (record.fields.get("stderr") or "").splitlines() if ln.strip()][-8:]
    for line in tail:
        print(f"  | {line}", file=sys.stderr)
    return 1


def cmd_ppl(args: argparse.Namespace) -> int:
    from pyharness.runners.perplexity import KldBase, PplParams, PplRequest, run_perplexity
    from pyharness.text import resolve_text

    params = PplParams(
        ctx=args.ctx,
        chunks=args.chunks,
        batch=args.batch,
        ubatch=args.ubatch,
        threads=args.threads,
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
        flash_attn=args.flash_attn,
        n_gpu_layers=args.n_gpu_layers,
        extra=tuple(args.extra or ()),
    ).validate()
    text = resolve_text(args.text)
    kld = None
    if args.kld:
        kld = KldBase(
            variant=args.kld_base_variant,
            backend=args.kld_base_backend,
            cache_type_k=args.kld_base_kv,
            cache_type_v=args.kld_base_kv,
        )
    ctx = _context(args)
    record = run_perplexity(ctx, PplRequest(params=params, text=text, kld=kld))
    if record.ok:
        p, k = record.perplexity or {}, record.kld
        print(f"PPL = {p['ppl']:.4f} +/- {p['ppl_err']:.5f}")
        if k:
            print(f"PPL(Q)/PPL(base) = {k['ppl_ratio']:.6f} +/- {k['ppl_ratio_err']:.6f}")
            print(
                f"mean KLD = {k['kld_mean']:.6f} +/- {k['kld_mean_err']:.6f}  (99%: {k['kld_p99']:.6f}, "
                f"max: {k['kld_max']:.6f})"
            )
            print(f"same top token = {k['same_top_pct']:.3f} +/- {k['same_top_err_pct']:.3f} %")
    return _finish(record, args)


def cmd_bench(args: argparse.Namespace) -> int:
    import statistics

    from pyharness.runners.bench import BenchParams, run_bench

    params = BenchParams(
        n_prompt=args.n_prompt,
        n_gen=args.n_gen,
        depth=args.depth,
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
        flash_attn=args.flash_attn,
        repetitions=args.repetitions,
        n_gpu_layers=args.n_gpu_layers,
        threads=args.threads,
        batch=args.batch,
        ubatch=args.ubatch,
        extra=tuple(args.extra or ()),
    ).validate()
    record = run_bench(_context(args), params)
    if record.ok:
        from pyharness.report import kv_label, md_table
        from pyharness.store import test_name

        rows = []
        for t in record.bench:
            ts = t.samples_ts
            rows.append(
                [
                    test_name(t.row["n_prompt"], t.row["n_gen"], t.row["n_depth"]),
                    kv_label(t.row["type_k"], t.row["type_v"]),
                    t.row["flash_attn"],
                    t.row["n_threads"],
                    f"{statistics.median(ts):.2f}",
                    f"{statistics.stdev(ts) if len(ts) > 1 else 0.0:.2f}",
                    len(ts),
                ]
            )
        print(
            md_table(
                ["test", "KV", "FA", "threads", "median t/s", "stdev", "samples"],
                rows,
                ["l", "l", "r", "r", "r", "r", "r"],
            )
        )
    return _finish(record, args)


def matrix_run_fields(
    name: str, executor: object, address: str | None, started: str, result: MatrixResult
) -> dict[str, object]:
    """The `matrix_runs` row of one invocation: its executor, wall time, counts and where its cells ran."""
    from collections import Counter

    from pyharness.host import host_info
    from pyharness.runners import now_utc

    h = host_info()
    placements = dict(Counter(getattr(executor, "placements", {}).values())) or {h.hostname: result.ran}
    return {
        "matrix": name,
        "executor": str(getattr(executor, "name", type(executor).__name__)),
        "address": address,
        "started_at": started,
        "finished_at": now_utc(),
        "seconds": result.seconds,
        "setup_seconds": result.setup_seconds,
        "cells_seconds": result.cells_seconds,
        "ran": result.ran,
        "ok": result.ok,
        "failed": len(result.failed),
        "skipped": result.skipped,
        "host_name": h.hostname,
        "gpu_name": h.gpu_name,
        "gpu_count": h.gpu_count,
        "placements": placements,
    }


def cmd_matrix(args: argparse.Namespace) -> int:
    from pyharness.executors import make_executor
    from pyharness.matrix import default_builder, load_matrix, select_cells
    from pyharness.runners import now_utc

    spec = load_matrix(args.file)
    if args.only:
        spec = select_cells(spec, args.only)
    executor = make_executor(
        args.executor, address=args.address, retries=args.retries, no_build=args.no_build or args.dry_run
    )
    with _open_store(args.db) as store:
        started = now_utc()
        result = executor.run(
            spec,
            store,
            builder=default_builder(args.no_build or args.dry_run, None),
            text=args.text,
            retry_failed=not args.skip_failed,
            dry_run=args.dry_run,
            echo=args.verbose,
            progress=not args.no_progress,
        )
        if result.ran and not args.dry_run:
            store.record_matrix_run(matrix_run_fields(spec.name, executor, args.address, started, result))
        where = store.path
    if args.dry_run:
        return 0
    print(
        f"matrix {spec.name}: ran {result.ran} ({result.ok} ok, {len(result.failed)} failed), "
        f"skipped {result.skipped} already stored, {result.seconds:.0f} s; results in {where}",
        file=sys.stderr,
    )
    for label, run_id, error in result.failed:
        print(
            f'  failed: {label}: {error} (run {run_id}; `sqlite3 {where} "select stderr from runs where '
            f'run_id={run_id}"`)',
            file=sys.stderr,
        )
    return 1 if result.failed else 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from pyharness.scaling import compare, scaling_markdown

    sc = compare(Path(args.serial), Path(args.parallel), args.matrix)
    text = scaling_markdown(sc)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(out)
    else:
        print(text, end="")
    return 0 if sc.met else 1


def cmd_report(args: argparse.Namespace) -> int:
    from pyharness.report import build_report, write_report

    with _open_store(args.db) as store:
        report = build_report(
            store, matrix=args.matrix, baseline=args.baseline, candidate=args.candidate, title=args.title
        )
    if args.out:
        written = write_report(report, Path(args.out), plots=not args.no_plots)
        for path in written:
            print(path)
    else:
        print(report.markdown, end="")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", required=True, help="upstream or patched (must be built: `pyharness build`)")
    p.add_argument("--backend", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="model name (`pyharness models list`), .gguf path, or synth:SHAPE (default smollm2-135m)",
    )
    p.add_argument("--db", help=DB_HELP)
    p.add_argument("--no-store", action="store_true", help="run and print, but do not write to the store")
    p.add_argument("--timeout", type=float, help="kill the run after this many seconds (it is stored as failed)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the commands run")


def register_eval_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "ppl",
        help="perplexity (and KL divergence against a base run) of a built variant",
        formatter_class=fmt,
        description="Run the variant's llama-perplexity on a model and text, parse PPL ± error and, with --kld, the "
        "KL-divergence statistics against a base run (upstream, f16 KV cache by default; its logits are cached "
        "under <cache>/kld-base/ and reused). Every run is stored with its provenance.",
        epilog="examples:\n  pyharness ppl --variant patched -c 512 --chunks 8 -ctk q8_0 -ctv q8_0 -fa on --kld\n"
        "  pyharness ppl --variant patched --text wiki.test.raw --extra --some-patch-flag 1\n\n"
        "text: --text FILE, else $PYHARNESS_TEXT, else wikitext-2-raw-v1 (test) through the datasets package.",
    )
    _add_common(p)
    p.add_argument("--text", help="evaluation text file (default: $PYHARNESS_TEXT or wikitext-2 via datasets)")
    p.add_argument("-c", "--ctx", type=int, default=512, help="context size per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=8, help="number of chunks (default 8)")
    p.add_argument("-b", "--batch", type=int, help="logical batch size (llama.cpp default when unset)")
    p.add_argument("-ub", "--ubatch", type=int, help="physical batch size")
    p.add_argument("-t", "--threads", type=int, help="threads (llama.cpp default when unset)")
    p.add_argument("-ctk", "--cache-type-k", default="f16", help="K cache type (default f16)")
    p.add_argument("-ctv", "--cache-type-v", default="f16", help="V cache type (default f16; quantized needs -fa on)")
    p.add_argument("-fa", "--flash-attn", default="auto", help="on, off or auto (default auto)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, help="layers to offload (cuda backend)")
    p.add_argument("--kld", action="store_true", help="also measure KL divergence against the base run")
    p.add_argument("--kld-base-variant", default="upstream", help="variant of the KLD base run (default upstream)")
    p.add_argument("--kld-base-backend", help="backend of the KLD base run (default: --backend)")
    p.add_argument("--kld-base-kv", default="f16", help="K and V cache type of the KLD base run (default f16)")
    p.add_argument(
        "--extra",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="ARG",
        help="pass every following argument to llama-perplexity (must come last)",
    )
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser(
        "bench",
        help="throughput of a built variant with llama-bench (every repetition kept)",
        formatter_class=fmt,
        description="Run the variant's llama-bench with -o jsonl and store every test (in upstream's llama_bench "
        "table, readable by scripts/compare-llama-bench.py) and every sample. List options take comma-separated "
        "values, as llama-bench does.",
        epilog="example:\n  pyharness bench --variant patched -p 512 -n 128 -d 0,8192 -ctk f16,q8_0 -ctv f16,q8_0 "
        "-fa 1 -r 5",
    )
    _add_common(p)
    p.add_argument("-p", "--n-prompt", type=_csv_ints, default=(512,), help="prompt sizes (default 512)")
    p.add_argument("-n", "--n-gen", type=_csv_ints, default=(128,), help="generation lengths (default 128)")
    p.add_argument("-d", "--depth", type=_csv_ints, default=(0,), help="context depths (default 0)")
    p.add_argument("-ctk", "--cache-type-k", type=_csv_strs, default=("f16",), help="K cache types (default f16)")
    p.add_argument("-ctv", "--cache-type-v", type=_csv_strs, default=("f16",), help="V cache types (default f16)")
    p.add_argument("-fa", "--flash-attn", type=_csv_strs, default=("auto",), help="on/off/auto or 1/0/-1")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="repetitions per test (default 5)")
    p.add_argument("-ngl", "--n-gpu-layers", type=_csv_ints, default=(), help="layers to offload")
    p.add_argument("-t", "--threads", type=_csv_ints, default=(), help="threads")
    p.add_argument("-b", "--batch", type=_csv_ints, default=(), help="logical batch sizes")
    p.add_argument("-ub", "--ubatch", type=_csv_ints, default=(), help="physical batch sizes")
    p.add_argument(
        "--extra",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="ARG",
        help="pass every following argument to llama-bench (must come last)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "matrix",
        help="run a declarative evaluation matrix (TOML), resuming where it stopped",
        formatter_class=fmt,
        description="Expand FILE.toml (variants x backends x models x runtime flags x evaluations) into runs, build "
        "what they need, skip every run whose configuration hash is already stored (so an interrupted matrix "
        "resumes), and keep going past failed runs (stored as failed, with their log). See matrices/default.toml "
        "and `python -c 'import pyharness.matrix as m; print(m.__doc__)'` for the format. With --executor ray the "
        "cells run as Ray tasks on a local Ray instance or, with --address, on a cluster (README: Matrices on a "
        "cluster).",
        epilog="examples:\n  pyharness matrix matrices/default.toml\n"
        "  pyharness matrix matrices/kv-compress-h100-batched.toml --only 'kv-compress'   # some cells only\n"
        "  pyharness matrix matrices/default.toml --executor ray                 # local Ray instance\n"
        "  pyharness matrix matrices/int8-fa-h100.toml --executor ray --address auto   # on a node of a cluster",
    )
    p.add_argument("file", help="matrix file, e.g. matrices/default.toml")
    p.add_argument("--db", help=DB_HELP)
    p.add_argument("--text", help="evaluation text for ppl and retrieval evaluations that name none")
    p.add_argument("--no-build", action="store_true", help="use the existing builds instead of `pyharness build`")
    p.add_argument("--dry-run", action="store_true", help="list the cells and whether each is stored; run nothing")
    p.add_argument("--skip-failed", action="store_true", help="do not retry cells whose last run failed")
    p.add_argument(
        "--only",
        metavar="REGEX",
        help="only the cells whose label (as --dry-run lists it) matches REGEX (a Python regular expression, "
        "searched); the others are neither run nor built for",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="print the commands run")
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: one cell after another in this process (default); ray: each cell a Ray task",
    )
    p.add_argument(
        "--address",
        help="with --executor ray: the cluster to join, `auto` or HEAD_HOST:PORT (default: a local Ray instance)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="with --executor ray: times a cell lost with its node or worker is run again before it is stored as "
        "failed (default 2)",
    )
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser(
        "report",
        help="render Markdown/CSV/PNG reports from the results store",
        formatter_class=fmt,
        description="Render throughput (compare-llama-bench style: medians over samples, with stdev and speedup) "
        "and perplexity/KLD tables from the store, grouped by hardware and commits. With --out, write README.md, "
        "bench.csv, ppl.csv and PNG plots there; otherwise print the Markdown.",
        epilog="example:\n  pyharness report --matrix default --out docs/results/default",
    )
    p.add_argument("--db", help=DB_HELP)
    p.add_argument("--out", help="output folder, e.g. docs/results/NAME")
    p.add_argument("--matrix", help="only runs of this matrix (its [matrix] name)")
    p.add_argument("--baseline", default="upstream", help="variant speedups are relative to (default upstream)")
    p.add_argument("--candidate", default="patched", help="variant compared against the baseline (default patched)")
    p.add_argument("--title", help="report title")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "scaling",
        help="compare a matrix run one cell at a time with the same matrix run through Ray",
        formatter_class=fmt,
        description="Read the invocation (executor, wall time, placements) and the cells of one matrix from two "
        "stores, one written by a serial run and one by a parallel run, and report the parallel wall time against "
        "its slowest cell (target <= 1.2x) with every cell's time and GPU. Both runs must come from one machine.",
        epilog="example:\n  pyharness scaling --serial gpu-out/ray-demo-serial.sqlite "
        "--parallel gpu-out/ray-demo-ray.sqlite --out docs/results/ray-demo/README.md",
    )
    p.add_argument("--serial", required=True, help="store of the run one cell at a time (--executor local)")
    p.add_argument("--parallel", required=True, help="store of the run through Ray (--executor ray)")
    p.add_argument("--matrix", help="the matrix's name, where a store holds several")
    p.add_argument("--out", help="write the Markdown there (default: print it)")
    p.set_defaults(func=cmd_scaling)
