"""Matrices: validation errors naming the line, expansion, the shipped files, and resume/keep-going with real runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness import matrix, paths
from pyharness.errors import HarnessError
from pyharness.store import Store

GOOD = """\
[matrix]
name = "t"
variants = ["upstream", "patched"]
backends = ["cpu"]
models = ["smollm2-135m"]

[flags]
kv = ["f16", "q8_0"]
flash_attn = "on"
threads = 2

[[eval]]
kind = "ppl"
ctx = 128
chunks = 4
kld_base = { variant = "upstream", kv = "f16" }

[[eval]]
kind = "bench"
prompt = [16]
gen = [4]
depth = [0, 32]
repetitions = 1
"""


def write(tmp_path: Path, text: str, name: str = "m.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    """1-based line number of the first line containing needle (counted independently of the code under test)."""
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(needle)


def test_expansion(tmp_path: Path) -> None:
    spec = matrix.load_matrix(write(tmp_path, GOOD))
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 2  # variants x kv x evals
    labels = [c.label() for c in cells]
    assert "patched-cpu smollm2-135m kv=q8_0 fa=on ppl(c128x4, kld vs upstream f16)" in labels
    assert "upstream-cpu smollm2-135m kv=f16 fa=on bench(p16 n4 d0,32 r1)" in labels
    assert all(c.flags["threads"] == 2 and c.flags["flash_attn"] == "on" for c in cells)
    params = matrix.bench_params(cells[-1])
    assert params.depth == (0, 32) and params.threads == (2,) and params.repetitions == 1


def test_exclude_and_extra_axis(tmp_path: Path) -> None:
    text = GOOD.replace("threads = 2\n", 'threads = 2\nextra = [[], ["--my-patch-flag"]]\n') + (
        '\n[[exclude]]\nvariant = "upstream"\nextra = ["--my-patch-flag"]\n'
    )
    cells = matrix.load_matrix(write(tmp_path, text)).cells()
    assert len(cells) == 2 * 2 * 2 + 2 * 2  # patched gets the flag on and off, upstream only off
    assert not [c for c in cells if c.variant == "upstream" and c.flags["extra"]]
    flagged = [c for c in cells if c.flags["extra"]]
    assert flagged and all(matrix.ppl_params(c).extra == ("--my-patch-flag",) for c in flagged if c.ev.kind == "ppl")


@pytest.mark.parametrize(
    ("edit", "needle", "message"),
    [
        (("threads = 2", "threads = 2\nthreadz = 4"), "threadz", "unknown key 'threadz' in [flags]"),
        (('variants = ["upstream", "patched"]', 'variants = ["upstream", "patchd"]'), "variants", "unknown variant"),
        (('backends = ["cpu"]', 'backends = ["cpu", "rocm"]'), "backends", "unknown backend 'rocm'"),
        (
            ('models = ["smollm2-135m"]', 'models = ["smollm2-135m", "no-such-model"]'),
            "models",
            "model 'no-such-model' does not resolve",
        ),
        (('models = ["smollm2-135m"]', 'models = ["synth:llama9-1t"]'), "models", "unknown synthetic shape"),
        (('flash_attn = "on"', 'flash_attn = "off"'), "flash_attn", "contradictory flags: a q8_0 V cache"),
        (('flash_attn = "on"', 'flash_attn = "int8"'), "flash_attn", "flash_attn = int8 needs a q8_kv K and V cache"),
        (('kv = ["f16", "q8_0"]', 'kv = ["f16", "q8_0"]\ncache_type_k = "f16"'), "kv =", "contradictory flags"),
        (("threads = 2", "threads = 2\nn_gpu_layers = 99"), "n_gpu_layers", "contradictory flags: n_gpu_layers"),
        (('kind = "bench"', 'kind = "bench"\nrepetitons = 3'), "repetitons", "unknown key 'repetitons'"),
        (('kind = "bench"', 'kind = "benchmark"'), "benchmark", "unknown eval kind"),
        (
            ('kld_base = { variant = "upstream", kv = "f16" }', 'kld_base = { variant = "upstrem" }'),
            "kld_base",
            "unknown variant 'upstrem' in kld_base",
        ),
        (("[flags]", "[flagz]"), "[flagz]", "unknown table or key 'flagz'"),
        (('kv = ["f16", "q8_0"]', 'kv = ["f16", "q7"]'), "kv =", "unknown KV cache type 'q7'"),
        (("ctx = 128", "ctx = [128, 256]"), "ctx =", "'ctx' takes one value, got 2"),
    ],
)
def test_validation_errors_name_the_line(tmp_path: Path, edit: tuple[str, str], needle: str, message: str) -> None:
    text = GOOD.replace(*edit)
    assert text != GOOD
    path = write(tmp_path, text)
    with pytest.raises(HarnessError) as info:
        matrix.load_matrix(path)
    assert f"{path}:{line_of(text, needle)}:" in info.value.problem
    assert message in info.value.problem


def test_error_in_second_eval_names_its_line(tmp_path: Path) -> None:
    text = GOOD + '\n[[eval]]\nkind = "bench"\nprompt = [-1]\n'
    path = write(tmp_path, text)
    with pytest.raises(HarnessError) as info:
        matrix.load_matrix(path)
    assert f"{path}:{len(text.splitlines())}:" in info.value.problem  # the last line: prompt = [-1]


def test_toml_syntax_error_is_reported(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="line 2"):
        matrix.load_matrix(write(tmp_path, "[matrix]\nname = \n"))


def test_shipped_matrices_are_valid() -> None:
    default = matrix.load_matrix(paths.project_root() / "matrices" / "default.toml")
    cells = default.cells()
    assert {c.variant for c in cells} == {"upstream", "patched"} and {c.backend for c in cells} == {"cpu"}
    assert {c.flags["cache_type_k"] for c in cells} == {"f16", "q8_0"}
    assert {c.ev.kind for c in cells} == {"ppl", "bench"}
    assert all(
        c.ev.values["kld_base"]
        == {
            "variant": "upstream",
            "backend": None,
            "cache_type_k": "f16",
            "cache_type_v": "f16",
            "flash_attn": None,
            "extra": [],
        }
        for c in cells
        if c.ev.kind == "ppl"
    )
    h100 = matrix.load_matrix(paths.project_root() / "matrices" / "h100-baseline.toml")
    cells = h100.cells()
    assert (
        len(cells) == 2 and {c.backend for c in cells} == {"cuda"} and {c.model for c in cells} == {"synth:llama3-8b"}
    )
    params = [matrix.bench_params(c) for c in cells]
    assert {p.cache_type_k for p in params} == {("f16",), ("q8_0",)}
    assert all(p.depth == (0, 8192, 32768) and p.flash_attn == ("on",) and p.n_gpu_layers == (99,) for p in params)


REAL = """\
[matrix]
name = "resume-test"
variants = ["upstream"]
backends = ["cpu"]
models = ["{model}"]

[flags]
kv = ["f16", "q8_0"]
flash_attn = "on"
threads = 2

[[eval]]
kind = "ppl"
ctx = 128
chunks = 4
kld_base = {{ variant = "upstream", kv = "f16" }}

[[eval]]
kind = "bench"
prompt = [16]
gen = [4]
repetitions = 1
"""


@pytest.fixture(scope="module")
def model_path() -> Path:
    return evalkit.real_model()


@pytest.mark.slow
def test_interrupted_matrix_resumes_and_a_second_run_does_nothing(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYHARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYHARNESS_TEXT", str(evalkit.real_text()))
    spec = matrix.load_matrix(write(tmp_path, REAL.format(model=model_path)))
    builder = matrix.default_builder(no_build=True, root=None)
    real_run_cell = matrix.run_cell
    calls = []

    def interrupt_third(*args: object, **kwargs: object) -> object:
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third cell runs
        return real_run_cell(*args, **kwargs)  # type: ignore[arg-type]

    with Store(tmp_path / "r.sqlite") as store:
        monkeypatch.setattr(matrix, "run_cell", interrupt_third)
        with pytest.raises(KeyboardInterrupt):
            matrix.run_matrix(spec, store, builder=builder, progress=False)
        assert store.count("runs") == 2
        monkeypatch.setattr(matrix, "run_cell", real_run_cell)

        resumed = matrix.run_matrix(spec, store, builder=builder, progress=False)
        assert (resumed.skipped, resumed.ran, resumed.ok, resumed.failed) == (2, 2, 2, [])
        assert store.count("runs") == 4
        assert store.count("kld") == 2 and store.count("bench_test") == 4
        kld = {r["base_variant"]: r for r in store.conn.execute("SELECT * FROM kld")}
        assert set(kld) == {"upstream"}
        # upstream f16 against its own f16 base: identical logits
        by_kv = dict(
            store.conn.execute(
                "SELECT json_extract(r.params, '$.cache_type_k'), k.kld_mean FROM kld k JOIN runs r USING (run_id)"
            )
        )
        # identical up to the CPU flash-attention's thread-dependent summation order (~1e-6 under load)
        assert by_kv["f16"] < 1e-4 and by_kv["q8_0"] > by_kv["f16"]
        same = store.conn.execute(
            "SELECT k.same_top_pct FROM kld k JOIN runs r USING (run_id) "
            "WHERE json_extract(r.params, '$.cache_type_k') = 'f16'"
        ).fetchone()[0]
        assert same == 100.0

        again = matrix.run_matrix(spec, store, builder=builder, progress=False)
        assert (again.skipped, again.ran) == (4, 0)
        assert store.count("runs") == 4
        assert {r["matrix"] for r in store.runs()} == {"resume-test"}
    assert len(list((tmp_path / "cache" / "kld-base").iterdir())) == 1  # one base, shared by both KV cells


@pytest.mark.slow
def test_failed_cell_is_recorded_and_the_matrix_goes_on(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYHARNESS_CACHE", str(tmp_path / "cache"))
    text = REAL.format(model=model_path).replace('kv = ["f16", "q8_0"]', 'extra = [["--no-such-flag"], []]')
    text = text[: text.index("[[eval]]")] + '[[eval]]\nkind = "bench"\nprompt = [16]\ngen = [0]\nrepetitions = 1\n'
    spec = matrix.load_matrix(write(tmp_path, text))
    with Store(tmp_path / "r.sqlite") as store:
        result = matrix.run_matrix(spec, store, builder=matrix.default_builder(True, None), progress=False)
        assert result.ran == 2 and result.ok == 1 and len(result.failed) == 1
        failed = store.runs(status="failed")[0]
        assert "--no-such-flag" in failed["cell"] and "--no-such-flag" in (failed["stderr"] + failed["stdout"])
        assert failed["exit_code"] != 0
        assert store.runs(status="ok")[0]["cell"].endswith("bench(p16 n0 d0 r1)")
        # failed cells are retried by default, skipped with retry_failed=False
        again = matrix.run_matrix(
            spec, store, builder=matrix.default_builder(True, None), progress=False, retry_failed=False
        )
        assert (again.ran, again.skipped) == (0, 2)


def test_dry_run_writes_no_synthetic_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("PYHARNESS_CACHE", str(tmp_path / "cache"))
    text = GOOD.replace('models = ["smollm2-135m"]', 'models = ["synth:llama-tiny"]')
    text = text[: text.index("[[eval]]")] + '[[eval]]\nkind = "bench"\nprompt = [16]\ngen = [4]\nrepetitions = 1\n'
    spec = matrix.load_matrix(write(tmp_path, text))

    def no_build(variant: str, backend: str) -> object:
        raise HarnessError(f"{variant}-{backend} is not built", "build it")

    with Store(tmp_path / "r.sqlite") as store:
        result = matrix.run_matrix(spec, store, builder=no_build, dry_run=True, progress=False)  # type: ignore[arg-type]
        assert result.ran == 0 and store.count("runs") == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 4 and all("is generated on the first real run" in line for line in listed)
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_only_selects_cells_by_label_and_keeps_their_configuration(tmp_path: Path) -> None:
    spec = matrix.load_matrix(write(tmp_path, GOOD))
    every = {c.label(): c.key() for c in spec.cells()}
    chosen = matrix.select_cells(spec, r"kv=q8_0 .*bench\(")
    cells = chosen.cells()
    assert sorted(c.label() for c in cells) == [
        "patched-cpu smollm2-135m kv=q8_0 fa=on bench(p16 n4 d0,32 r1)",
        "upstream-cpu smollm2-135m kv=q8_0 fa=on bench(p16 n4 d0,32 r1)",
    ]
    # the same cells as in the whole matrix, so what a selection stores the whole matrix finds stored
    assert all(every[c.label()] == c.key() for c in cells)
    assert len(spec.cells()) == 8, "selecting must not change the matrix it was made from"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [("no such cell", "matches none of the 8 cells"), ("kv=(q8_0", "is not a regular expression")],
)
def test_only_refuses_a_pattern_that_selects_nothing(tmp_path: Path, pattern: str, message: str) -> None:
    spec = matrix.load_matrix(write(tmp_path, GOOD))
    with pytest.raises(matrix.MatrixError, match=re.escape(message)):
        matrix.select_cells(spec, pattern)


def test_only_builds_and_lists_the_selected_cells_alone(tmp_path: Path, capsys) -> None:
    spec = matrix.select_cells(matrix.load_matrix(write(tmp_path, GOOD)), r"^patched-cpu .* bench\(")
    asked: list[tuple[str, str]] = []

    def no_build(variant: str, backend: str) -> object:
        asked.append((variant, backend))
        raise HarnessError(f"{variant}-{backend} is not built", "build it")

    with Store(tmp_path / "r.sqlite") as store:
        result = matrix.run_matrix(spec, store, builder=no_build, dry_run=True, progress=False)  # type: ignore[arg-type]
        assert result.ran == 0 and store.count("runs") == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 2 and all(" patched-cpu " in line and " bench(" in line for line in listed)
    assert asked == [("patched", "cpu")], "a selection without upstream cells must not build upstream"


def test_only_on_the_command_line(tmp_path: Path, capsys) -> None:
    from pyharness.cli import main

    path = write(tmp_path, GOOD)
    assert main(["matrix", str(path), "--only", "nothing matches this", "--dry-run", "--db", str(tmp_path / "r")]) == 1
    assert "matches none of the 8 cells" in capsys.readouterr().err
