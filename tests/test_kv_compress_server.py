"""llama-server's per-request KV compression budget (issue 8: `kv_compress_budget` / `kv_compress_rate` in a completion
request, over the server's `--kv-compress` schedule), the patched CPU build on SmolLM2.

A server compressing every 64 positions at rate 2 answers a 300-token prompt greedily three ways: with its own rate,
with a request budget larger than the sequence (which must give the uncompressed server's answer token for token), and
with a request budget of 48 slots (which must change the answer, or the override did nothing). The same request
made again after the others answers as the first did: nothing of the earlier requests may change it. A budget below the
protected window and a rate below 1 are refused with a message; a server without --kv-compress refuses both fields.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness.models import get_model
from pyharness.paged_server import free_port, running_server

pytestmark = pytest.mark.slow

BASE = ["-c", "2048", "-np", "2", "-t", "2", "-fa", "on", "--kv-cache", "paged"]
# the default observation: every query since the last compression (64). The first request meets a cache whose layers
# still share their tables, the later ones a cache whose tables parted; they must answer alike (until stop 24 the
# metric read stale positions in every layer but the first while the tables were shared, and the answers differed)
COMPRESS = ["--kv-compress", "kvc", "--kv-compress-rate", "2", "--kv-compress-every", "64"]


def prompt_text() -> str:
    text = evalkit.real_text().read_text(encoding="utf-8")
    start = text.index("Robert Boulter")
    return text[start : start + 1400]


@pytest.fixture(scope="module")
def prompt() -> str:
    return prompt_text()


def server(tmp: Path, extra: list[str]) -> Any:
    binary = evalkit.patched_cpu_binary("llama-server")
    cmd = [str(binary), "-m", str(get_model("smollm2-135m")), "--port", str(free_port()), *BASE, *extra]
    return running_server(cmd, {}, tmp / ("server" + "-".join(extra[:2]) + ".log"), 300)


def complete(port: int, prompt: str, **fields: object) -> tuple[int, dict[str, Any]]:
    body = {"prompt": prompt, "n_predict": 32, "temperature": 0, "cache_prompt": False, "return_tokens": True}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion",
        data=json.dumps({**body, **fields}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


@pytest.fixture(scope="module")
def answers(prompt: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, dict]]]:
    tmp = tmp_path_factory.mktemp("kvc-server")
    out: dict[str, tuple[int, dict]] = {}
    with server(tmp, []) as port:
        out["plain"] = complete(port, prompt)
        out["plain_budget"] = complete(port, prompt, kv_compress_budget=48)
    with server(tmp, COMPRESS) as port:
        out["server_rate"] = complete(port, prompt)
        out["budget_all"] = complete(port, prompt, kv_compress_budget=100000)
        out["budget_48"] = complete(port, prompt, kv_compress_budget=48)
        out["budget_low"] = complete(port, prompt, kv_compress_budget=8)
        out["rate_low"] = complete(port, prompt, kv_compress_rate=0.5)
        out["after_errors"] = complete(port, prompt)
    yield out


def tokens(answer: tuple[int, dict]) -> list[int]:
    status, data = answer
    assert status == 200, data
    return [int(t) for t in data["tokens"]]


def test_a_budget_over_the_length_answers_as_the_uncompressed_server(answers: dict) -> None:
    assert tokens(answers["budget_all"]) == tokens(answers["plain"])


def test_the_request_budget_replaces_the_servers(answers: dict) -> None:
    assert tokens(answers["budget_48"]) != tokens(answers["plain"])
    assert tokens(answers["server_rate"]) != tokens(answers["budget_48"])
    # the next request without a budget goes back to the server's rate, and the requests before it leave no trace
    assert tokens(answers["after_errors"]) == tokens(answers["server_rate"])


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("budget_low", "invalid KV compression for this request"),
        ("rate_low", "invalid KV compression for this request"),
        ("plain_budget", "need a server started with --kv-compress"),
    ],
)
def test_bad_budgets_are_refused_with_a_message(answers: dict, key: str, message: str) -> None:
    status, data = answers[key]
    assert status == 400 and message in json.dumps(data), (status, data)
