"""FlashAttention perf tables: parsed from test-backend-ops lines, medians per type, ratios baseline / candidate."""

from __future__ import annotations

import pytest

from pyharness.errors import HarnessError
from pyharness.fa_perf import parse, split_params, table


def line(kv_type: str, us: float, nb: int = 1, nr2: int = 4, nr3: int = 1) -> str:
    return (
        f"  FLASH_ATTN_EXT(hsk=128,hsv=128,nh=8,nr23=[{nr2},{nr3}],kv=16384,nb={nb},mask=1,sinks=0,max_bias=0.000000,"
        f"logit_softcap=0.000000,prec=f32,type_K={kv_type},type_V={kv_type},permute=[0,1,2,3],kv_view=1,"
        f"v_is_view_of_k=0,n_kv_max=0):      29840 runs -    {us:.2f} us/run - 268.44 MFLOP/run -   7.97 TFLOPS"
    )


def test_brackets_keep_their_commas() -> None:
    assert split_params("a=1,nr23=[4,1],c=x") == {"a": "1", "nr23": "[4,1]", "c": "x"}


def test_table_shows_medians_and_ratios() -> None:
    log = "\n".join([line("f16", 30.0), line("f16", 40.0), line("q8_0", 60.0), line("q8_kv", 20.0), "noise"])
    cases = parse(log)
    assert len(cases) == 4
    rows = [r for r in table(cases, "q8_kv").splitlines() if r.startswith("| 128")]
    assert rows == ["| 128 | 4 | 16384 | 1 | 35.00 | 60.00 | 20.00 | 1.75x | 3.00x |"]


def test_shapes_are_separate_rows() -> None:
    log = "\n".join([line("f16", 30.0, nb=1), line("q8_kv", 15.0, nb=1), line("q8_kv", 90.0, nb=512, nr2=8)])
    rows = [r for r in table(parse(log), "q8_kv").splitlines() if r.startswith("| 128")]
    assert rows == ["| 128 | 4 | 16384 | 1 | 30.00 | 15.00 | 2.00x |", "| 128 | 8 | 16384 | 512 | - | 90.00 | - |"]


def test_missing_candidate_or_empty_log_is_an_error() -> None:
    with pytest.raises(HarnessError, match="no FLASH_ATTN_EXT"):
        table(parse("nothing here"), "q8_kv")
    with pytest.raises(HarnessError, match="q8_kv"):
        table(parse(line("f16", 30.0)), "q8_kv")


def paged(us: float, *, nb: int = 1, nr: int = 4, n_seq: int = 1, page: int = 64, uneven: int = 0) -> str:
    return (
        f"  FLASH_ATTN_PAGED(hsk=128,hsv=128,nh=8,nr={nr},kv=16384,nb={nb},n_seq={n_seq},page_size={page},"
        f"type_KV=f16,uneven={uneven},sinks=0,max_bias=0.000000,logit_softcap=0.000000,n_swa=0):"
        f"      120 runs -    {us:.2f} us/run -  67.11 MFLOP/run -   2.73 GFLOPS"
    )


def test_paged_cases_stand_beside_flash_attn_ext_at_the_same_shape() -> None:
    log = "\n".join(
        [
            line("f16", 30.0, nb=512),
            paged(31.0, nb=512),
            paged(33.0, nb=512, page=256),  # another page size: its own column
            paged(90.0, nb=2048, n_seq=4),  # four sequences of 512 tokens: flash_attn_ext's 4 streams
            line("f16", 80.0, nb=512, nr3=4),
            paged(9.0, nb=6, n_seq=4),  # unequal tokens per sequence: left out
            paged(10.0, nb=512, uneven=1),  # uneven lengths: no flash_attn_ext shape, left out
            paged(12.0, nb=512, nr=8),  # GQA 8: another row
        ]
    )
    cases = parse(log)
    assert sorted(c.kv_type for c in cases) == ["f16", "f16", "paged-f16", "paged-f16", "paged-f16", "paged-f16-p256"]
    rows = [r for r in table(cases, "paged-f16", baselines=("f16",)).splitlines() if r.startswith("| 128")]
    assert rows == [
        "| 128 | 4 | 1 | 16384 | 512 | 30.00 | 31.00 | 0.97x |",
        "| 128 | 4 | 4 | 16384 | 512 | 80.00 | 90.00 | 0.89x |",
        "| 128 | 8 | 1 | 16384 | 512 | - | 12.00 | - |",
    ]


def perf_env_log() -> str:
    parts = []
    for rnd, (a, b) in enumerate([(100.0, 200.0), (110.0, 220.0)], 1):
        for env, us in (("X=1", a), ("X=2", b)):
            parts += [f"## round {rnd} env {env} op FLASH_ATTN_PAGED regex kv=16384", paged(us, nb=8, n_seq=8)]
            parts += [f"## round {rnd} env {env} op FLASH_ATTN_EXT regex kv=16384", line("f16", 105.0, nr3=8)]
    return "\n".join(parts) + "\n"


def test_env_keeps_only_that_environments_sections() -> None:
    from pyharness.fa_perf import select_env

    log = perf_env_log()
    one = [r for r in table(parse(select_env(log, "X=1")), "paged-f16").splitlines() if r.startswith("| 128")]
    two = [r for r in table(parse(select_env(log, "X=2")), "paged-f16").splitlines() if r.startswith("| 128")]
    assert one == ["| 128 | 4 | 8 | 16384 | 1 | 105.00 | 105.00 | 1.00x |"]
    assert two == ["| 128 | 4 | 8 | 16384 | 1 | 105.00 | 210.00 | 0.50x |"]
    with pytest.raises(HarnessError, match="X=1, X=2"):
        select_env(log, "X=3")
    with pytest.raises(HarnessError, match="perf-env"):
        select_env(line("f16", 1.0), "X=1")
