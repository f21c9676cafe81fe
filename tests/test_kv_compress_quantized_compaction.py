"""KV-Compress's compaction of quantized pages (issue 8) through llama-perplexity of the patched CPU build on SmolLM2.

Evicting slots moves the kept rows to the front of each head's pages. q8_0 pages (68-byte rows at head size 64) move
on the backend as F32 views of their bytes; with LLAMA_KV_PAGED_HOST_COMPACTION=1, every pool moves its rows through
the host, byte for byte. Both must leave the same bytes, so every chunk's printed perplexity must be the same. Q8_KV
pages (66-byte rows, not whole words) always take the host path, which reads and writes each touched layer's pools
once; with LLAMA_KV_PAGED_HOST_COMPACTION=copies it goes one copy at a time instead, and both must agree. A run
without compression must differ from the compressed one, so that the comparison sees an eviction.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness.models import get_model

RUN = ["-c", "1024", "--chunks", "2", "-b", "512", "-t", "2", "-fa", "on", "--kv-cache", "paged"]
COMPRESS = ["--kv-compress", "kvc", "--kv-compress-rate", "4", "--kv-compress-every", "128"]
CHUNKS = re.compile(r"\[\d+\]([\d.]+),")


def chunk_values(cache_type: str, *extra: str, host: str | None = None) -> list[str]:
    """Every chunk's printed perplexity, as printed."""
    binary = evalkit.patched_cpu_binary("llama-perplexity")
    cmd = [
        str(binary),
        "-m",
        str(get_model("smollm2-135m")),
        "-f",
        str(evalkit.real_text()),
        *RUN,
        "-ctk",
        cache_type,
        "-ctv",
        cache_type,
        *extra,
    ]
    env = dict(os.environ)
    env.pop("LLAMA_KV_PAGED_HOST_COMPACTION", None)
    if host is not None:
        env["LLAMA_KV_PAGED_HOST_COMPACTION"] = host
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    values = CHUNKS.findall(out)
    assert len(values) == 2, out[-3000:]
    return values


def test_q8_0_pages_compact_on_the_backend_as_through_the_host() -> None:
    backend = chunk_values("q8_0", *COMPRESS)
    host = chunk_values("q8_0", *COMPRESS, host="1")
    assert backend == host, f"q8_0 pages: backend compaction {backend}, host compaction {host}"
    full = chunk_values("q8_0")
    assert full != backend, f"compression every 128 positions changed nothing ({full}): no rows were moved"


def test_q8_kv_pages_compact_through_the_host_in_one_pass_per_layer() -> None:
    batched = chunk_values("q8_kv", *COMPRESS)
    per_copy = chunk_values("q8_kv", *COMPRESS, host="copies")
    assert batched == per_copy, f"Q8_KV pages: one pass per layer {batched}, one copy at a time {per_copy}"
