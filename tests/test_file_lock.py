"""pyharness.file_lock: exclusive between processes, reentrant within one, and saying so when it waits."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyharness.file_lock import file_lock

HOLD = """
import sys, time
from pathlib import Path
from pyharness.file_lock import file_lock
with file_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_in_child(lock: Path, seconds: float) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_second_process_waits_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "sub" / ".lock"
    child = hold_in_child(lock, 1.5)
    start = time.monotonic()
    with file_lock(lock, waiting="waiting for the other one"):
        waited = time.monotonic() - start
    child.wait(timeout=30)
    assert waited > 0.5, waited
    assert "waiting for the other one" in capsys.readouterr().err


def test_a_free_lock_is_taken_without_a_word(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with file_lock(tmp_path / ".lock", waiting="waiting for the other one"):
        pass
    assert capsys.readouterr().err == ""


def test_taking_it_again_inside_its_own_block_does_not_wait_on_itself(tmp_path: Path) -> None:
    # in a child with a timeout: a lock that waited on itself would hang
    code = (
        "import sys; from pathlib import Path; from pyharness.file_lock import file_lock\n"
        "p = Path(sys.argv[1])\n"
        "with file_lock(p):\n"
        "    with file_lock(p):\n"
        "        pass\n"
        "    print('inner done')\n"
        "with file_lock(p):\n"
        "    print('again')\n"
    )
    args = [sys.executable, "-c", code, str(tmp_path / ".lock")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["inner", "done", "again"]


def test_the_lock_is_released_for_others_after_a_nested_block(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with file_lock(lock), file_lock(lock):
        pass
    # released: a child takes it at once
    child = hold_in_child(lock, 0.0)
    assert child.wait(timeout=30) == 0


def test_threads_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    inside = 0
    most = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(20):
            with file_lock(lock):
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.002)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert most == 1
