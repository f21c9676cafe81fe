"""`llama-server --parallel N` answering N requests sent at the same time, with the standard and the paged KV cache
(issue 7, item 5), and the comparisons that tell the cache apart from batch composition.

A trial starts a fresh server (one cache), sends every prompt to `/completion` (greedy: temperature 0, `n_predict`
tokens, token ids returned) and stops the server. Requests go either all at once from threads released together by
a barrier (`concurrent`: the server batches the sequences, and when each request's prompt joins the batch depends on
timing) or one after another (`sequential`: each request alone in its batches, so its result does not depend on the
others). Repeating a trial tells whether a cache is deterministic under the same mode; comparing the caches under
`sequential` tells a cache difference apart from a batch-composition one.

`pyharness.runners.paged` runs the trials for the matrix (`kind = "paged-server"`) and stores them with the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyharness.errors import HarnessError
from pyharness.paged_generation import FALLBACK_LOG, PROMPTS, first_difference, paged_cache_used

MODES = ("concurrent", "sequential")
CACHE_ARGS = {"standard": ["--kv-cache", "standard"], "paged": ["--kv-cache", "paged"]}
LOG_LEVEL = re.compile(r"^[0-9.]+ ([EW]) ")  # common_log's prefix: time, then the level letter
LOG_PREFIX = re.compile(r"^[0-9.]+ [A-Z] ")


@dataclass
class ServerConfig:
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    parallel: int = 4
    n_predict: int = 128
    ctx: int = 2048  # the server's whole context: ctx / parallel per slot
    threads: int = 2
    flash_attn: str = "on"
    ignore_eos: bool = True  # every answer n_predict tokens long, so the comparisons cover all of them
    extra: list[str] = field(default_factory=list)  # more llama-server arguments, for both caches
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 600.0

    def command(self, binary: Path, model: Path, cache: str, port: int) -> list[str]:
        cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["-c", str(self.ctx), "--parallel", str(self.parallel), "-t", str(self.threads)]
        cmd += ["-tb", str(self.threads), "-fa", self.flash_attn, "--no-webui", *CACHE_ARGS[cache]]
        # -lv 5: llama.cpp's own info lines (the KV cache's size: which cache was made), the slots' trace (a prompt
        # joining the batch) and the server's debug lines (each batch decoded): which batch each prompt joined
        return [*cmd, "-lv", "5", *self.extra]

    def request(self, prompt: str) -> dict[str, Any]:
        return {
            "prompt": prompt,
            "n_predict": self.n_predict,
            "temperature": 0,
            "ignore_eos": self.ignore_eos,
            "return_tokens": True,
            "stream": False,
        }


@dataclass
class Answer:
    prompt: int  # index into the prompts
    ok: bool
    status: int  # HTTP status; 0: no response
    content: str = ""
    tokens: list[int] = field(default_factory=list)
    tokens_predicted: int = 0
    id_slot: int = -1
    error: str = ""
    sent_s: float = 0.0  # seconds after the trial's first request was sent
    answered_s: float = 0.0
    batch: int = -1  # the server's batch (counted from its first) in which this request's prompt began; -1: unknown


@dataclass
class Trial:
    cache: str
    mode: str
    repeat: int
    command: list[str]
    answers: list[Answer]
    kv_log: list[str]  # the server's log lines about its KV cache (size; a fallback from paged)
    paged_active: bool
    problems: list[str] = field(default_factory=list)  # the server's warning and error lines, each once
    error: str = ""  # the server did not start or died
    log_tail: str = ""  # the end of the server's log when something failed

    @property
    def answered(self) -> int:
        return sum(a.ok for a in self.answers)

    def composition(self) -> str:
        """The prompts grouped by the batch their evaluation began in, e.g. `[0 1 2][3]` (`?`: not in the log)."""
        if not self.answers or any(a.batch < 0 for a in self.answers):
            return "?"
        groups: dict[int, list[int]] = {}
        for a in sorted(self.answers, key=lambda a: (a.batch, a.prompt)):
            groups.setdefault(a.batch, []).append(a.prompt)
        return "".join("[" + " ".join(map(str, g)) + "]" for g in groups.values())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def post_completion(port: int, config: ServerConfig, index: int, t0: float) -> Answer:
    body = json.dumps(config.request(config.prompts[index])).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion", data=body, headers={"Content-Type": "application/json"}
    )
    sent = time.monotonic() - t0
    try:
        with urllib.request.urlopen(req, timeout=config.request_timeout_s) as resp:
            status, text = int(resp.status), resp.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        status, text = int(exc.code), exc.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return Answer(index, False, 0, error=f"no response: {exc}", sent_s=round(sent, 3))
    answered = round(time.monotonic() - t0, 3)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return Answer(index, False, status, error=f"not JSON: {text[:200]}", sent_s=round(sent, 3), answered_s=answered)
    if status != 200 or "content" not in data:
        error = json.dumps(data.get("error", data))[:300]
        return Answer(index, False, status, error=error, sent_s=round(sent, 3), answered_s=answered)
    return Answer(
        index,
        True,
        status,
        content=str(data["content"]),
        tokens=[int(t) for t in data.get("tokens") or []],
        tokens_predicted=int(data.get("tokens_predicted", 0)),
        id_slot=int(data.get("id_slot", -1)),
        sent_s=round(sent, 3),
        answered_s=answered,
    )


def send_all(port: int, config: ServerConfig, mode: str) -> list[Answer]:
    """Every prompt once: all at once (threads released by one barrier) or one after another."""
    n = len(config.prompts)
    t0 = time.monotonic()
    if mode == "sequential":
        return [post_completion(port, config, i, t0) for i in range(n)]
    answers: list[Answer | None] = [None] * n
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait()
        answers[i] = post_completion(port, config, i, t0)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(config.request_timeout_s + 30)
    return [a or Answer(i, False, 0, error="the request's thread did not finish") for i, a in enumerate(answers)]


@contextlib.contextmanager
def running_server(cmd: Sequence[str], env: Mapping[str, str], log: Path, timeout_s: float) -> Iterator[int]:
    """Start llama-server (its output to `log`), wait until /health answers 200, yield its port, stop it."""
    port = int(cmd[cmd.index("--port") + 1])
    with log.open("w") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + timeout_s
        while _get(f"http://127.0.0.1:{port}/health", 5) != 200:
            if proc.poll() is not None:
                raise HarnessError(f"llama-server exited {proc.returncode} before it was ready", f"see {log}")
            if time.monotonic() > deadline:
                raise HarnessError(f"llama-server not ready after {timeout_s:.0f} s", f"see {log}")
            time.sleep(0.2)
        yield port
        if proc.poll() is not None:
            raise HarnessError(f"llama-server exited {proc.returncode} while answering", f"see {log}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def kv_lines(log_text: str) -> list[str]:
    """The log lines about the KV cache made (its size; a paged cache's fallback), without their time and level."""
    return [
        LOG_PREFIX.sub("", ln).strip()
        for ln in log_text.splitlines()
        if ("kv_cache" in ln and "size" in ln) or FALLBACK_LOG in ln
    ]


IGNORED_WARNINGS = ("security: no API key",)


def log_problems(log_text: str, limit: int = 20) -> list[str]:
    """The warning and error lines of a server log, each once (without its time), at most `limit`."""
    seen: list[str] = []
    for line in log_text.splitlines():
        match = LOG_LEVEL.match(line)
        if not match or any(w in line for w in IGNORED_WARNINGS):
            continue
        text = line[match.start(1) :].strip()
        if text not in seen:
            seen.append(text)
    return seen[:limit]


NEW_PROMPT = re.compile(r"slot +\S+: id +(\d+) \| task -?\d+ \| new prompt,")
BATCH_DECODED = "n_batch (effective) = "


def prompt_batches(log_text: str) -> list[tuple[int, int]]:
    """(slot, batch) for every prompt a slot began, in the log's order: `batch` counts the batches decoded before
    it (a prompt joins the batch that is decoded next)."""
    out = []
    decoded = 0
    for line in log_text.splitlines():
        if BATCH_DECODED in line and line.rstrip().endswith("off = 0"):
            decoded += 1
        elif match := NEW_PROMPT.search(line):
            out.append((int(match.group(1)), decoded))
    return out


def assign_batches(answers: Sequence[Answer], batches: Sequence[tuple[int, int]]) -> None:
    """Give each answer the batch its prompt began in: a slot's prompts in the log's order go to the answers of
    that slot in the order their requests were sent."""
    per_slot: dict[int, list[int]] = {}
    for slot, batch in batches:
        per_slot.setdefault(slot, []).append(batch)
    for a in sorted(answers, key=lambda a: (a.sent_s, a.prompt)):
        if a.ok and per_slot.get(a.id_slot):
            a.batch = per_slot[a.id_slot].pop(0)


def run_trial(
    binary: Path, model: Path, config: ServerConfig, cache: str, mode: str, repeat: int, env: Mapping[str, str]
) -> Trial:
    """One fresh server, every prompt once; a server that fails is a trial with `error` set (never an exception)."""
    cmd = config.command(binary, model, cache, free_port())
    with tempfile.TemporaryDirectory(prefix="pyharness-server-") as tmp:
        log = Path(tmp) / "server.log"
        answers: list[Answer] = []
        error = ""
        try:
            with running_server(cmd, env, log, config.startup_timeout_s) as port:
                answers = send_all(port, config, mode)
        except HarnessError as exc:
            error = exc.problem
        if len(answers) < len(config.prompts):  # the server failed: every prompt is an answer that did not come
            answers = [Answer(i, False, 0, error=error or "no answer") for i in range(len(config.prompts))]
        text = log.read_text(errors="replace") if log.is_file() else ""
    lines = kv_lines(text)
    assign_batches(answers, prompt_batches(text))
    paged_active = paged_cache_used(lines)
    failed = bool(error) or not all(a.ok for a in answers)
    tail = text[-6000:] if failed else ""
    return Trial(cache, mode, repeat, cmd, answers, lines, paged_active, log_problems(text), error, tail)


def run_trials(
    binary: Path,
    model: Path,
    config: ServerConfig,
    *,
    modes: Sequence[str] = MODES,
    repeats: int = 2,
    env: Mapping[str, str] | None = None,
) -> list[Trial]:
    """Every cache x mode x repeat, in that order (one server at a time)."""
    for mode in modes:
        if mode not in MODES:
            raise HarnessError(f"unknown request mode {mode!r}", f"use one of: {', '.join(MODES)}")
    if not binary.is_file():
        raise HarnessError(f"{binary} does not exist", "build it: `pyharness build --variant patched --backend cpu`")
    return [
        run_trial(binary, model, config, cache, mode, r, env or {})
        for cache in CACHE_ARGS
        for mode in modes
        for r in range(repeats)
    ]


# ------------------------------------------------------------------------------------------------ comparisons


def answer_key(a: Answer) -> list[int] | str:
    """What two answers are compared by: the token ids when the server returned them, else the text."""
    return a.tokens if a.tokens else a.content


def answer_difference(a: Answer, b: Answer) -> int | None:
    """First differing token (or character, without token ids) of two answers; None when identical."""
    if a.tokens and b.tokens:
        return first_difference(a.tokens, b.tokens)
    return first_difference([ord(c) for c in a.content], [ord(c) for c in b.content])


def summarize(trials: Sequence[Trial]) -> dict[str, Any]:
    """The verdicts the report shows:

    answered        per (cache, mode): answers that came back, out of those sent, over every repeat
    deterministic   per (cache, mode): every repeat gave every prompt the same answer (None: fewer than 2 repeats,
                    or an answer missing)
    batches         per (cache, mode): each repeat's prompts grouped by the batch they began in (`Trial.composition`)
    across_caches   per mode: per prompt, the first differing token of the standard and the paged answer (first
                    repeat of each; None: identical)
    same_batches    every standard and paged trial of one mode whose prompts began in the same batches, and whether
                    they gave the same answers: [mode, standard repeat, paged repeat, composition, identical]
    """
    groups: dict[tuple[str, str], list[Trial]] = {}
    for t in trials:
        groups.setdefault((t.cache, t.mode), []).append(t)

    def complete(t: Trial) -> bool:
        return t.answered == len(t.answers) > 0

    answered = {
        f"{c} {m}": [sum(t.answered for t in ts), sum(len(t.answers) for t in ts)] for (c, m), ts in groups.items()
    }
    deterministic: dict[str, bool | None] = {}
    for (c, m), ts in groups.items():
        if len(ts) < 2 or not all(complete(t) for t in ts):
            deterministic[f"{c} {m}"] = None
            continue
        first = [answer_key(a) for a in ts[0].answers]
        deterministic[f"{c} {m}"] = all([answer_key(a) for a in t.answers] == first for t in ts[1:])
    batches = {f"{c} {m}": [t.composition() for t in ts] for (c, m), ts in groups.items()}
    across: dict[str, list[int | None] | None] = {}
    same_batches: list[list[Any]] = []
    for mode in sorted({t.mode for t in trials}):
        std, pag = groups.get(("standard", mode), []), groups.get(("paged", mode), [])
        if not std or not pag or not complete(std[0]) or not complete(pag[0]):
            across[mode] = None
        else:
            across[mode] = [answer_difference(a, b) for a, b in zip(std[0].answers, pag[0].answers, strict=True)]
        for a in filter(complete, std):
            for b in filter(complete, pag):
                if a.composition() == b.composition() != "?":
                    same = [answer_key(x) for x in a.answers] == [answer_key(y) for y in b.answers]
                    same_batches.append([mode, a.repeat, b.repeat, a.composition(), same])
    return {
        "answered": answered,
        "deterministic": deterministic,
        "batches": batches,
        "across_caches": across,
        "same_batches": same_batches,
    }


def trials_as_dicts(trials: Sequence[Trial]) -> list[dict[str, Any]]:
    return [asdict(t) | {"answered": t.answered} for t in trials]


def trials_from_dicts(rows: Sequence[Mapping[str, Any]]) -> list[Trial]:
    out = []
    for row in rows:
        fields = {k: v for k, v in row.items() if k != "answered"}
        fields["answers"] = [Answer(**a) for a in row["answers"]]
        out.append(Trial(**fields))
    return out
