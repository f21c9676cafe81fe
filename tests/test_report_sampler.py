"""The sampler latency table: stored medians, same-device ratios and the op against the same host's CPU chain."""

from __future__ import annotations

from typing import Any

from pyharness.report import sampler_section


def row(device: str, variant: str, mode: str, vocab: int, rows: int, value: float) -> dict[str, Any]:
    return {"device": device, "variant": variant, "metric": f"{mode} vocab={vocab} rows={rows} median", "value": value}


def table(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return split[0], split[2:]


def test_op_is_compared_with_the_cpu_chain_of_the_same_vocab_and_rows() -> None:
    rows = [
        row("CPU", "upstream", "chain", 1000, 1, 90.0),
        row("CPU", "upstream", "chain", 2000, 1, 300.0),
        row("CUDA0", "upstream", "backend-chain", 1000, 1, 60.0),
        row("CUDA0", "patched", "op", 1000, 1, 20.0),
        row("CUDA0", "patched", "op", 2000, 1, 25.0),
        row("CUDA0", "patched", "op", 2000, 8, 40.0),  # no CPU chain at rows 8: no ratio
    ]
    header, body = table(sampler_section(rows))
    assert header[-1] == "CPU chain / op"
    by_key = {(r[0], r[1], r[2]): r for r in body}
    assert by_key[("CUDA0", "1000", "1")][-1] == "4.5x"
    assert by_key[("CUDA0", "2000", "1")][-1] == "12.0x"
    assert by_key[("CUDA0", "2000", "8")][-1] == "-"
    assert by_key[("CPU", "1000", "1")][-1] == "-"
    assert by_key[("CUDA0", "1000", "1")][header.index("backend-chain / op")] == "3.0x"


def test_no_cross_column_without_a_cpu_chain() -> None:
    header, _ = table(sampler_section([row("CUDA0", "patched", "op", 1000, 1, 20.0)]))
    assert "CPU chain / op" not in header
