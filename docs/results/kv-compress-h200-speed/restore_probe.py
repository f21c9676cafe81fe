"""What a restored repetition of llama-bench spends, from `scripts/gpu-check restore-probe`'s files (stop 30).

    python3 restore_probe.py PROBE.txt [STEP_LOG JSON_LOG ...]

For every llama-bench run in PROBE.txt (its `# ...` header, the JSON line, the `restored in` lines): the t/s of each
repetition (the first decodes the depth, the others restore it from a saved state) and each restore's time. For every
STEP_LOG (the stderr of a run with LLAMA_BENCH_STEP_TIMES, and JSON_LOG the file holding that run's JSON line as its
last, may be the same file): per timed repetition, the sum over its batches of the host's and the device's time, and
what the repetition took beyond that sum (llama-bench's time for the repetition, from its samples, minus the
batches').
"""

import json
import re
import sys

STEP = re.compile(r"batch of (\d+) after (\d+): host ([\d.]+) ms, then device ([\d.]+) ms")
RESTORED = re.compile(r"restored in ([\d.]+) ms")


def read_lines(path: str) -> list[str]:
    with open(path) as f:
        return f.readlines()


def json_lines(path: str) -> list[dict]:
    return [json.loads(line) for line in read_lines(path) if line.startswith("{")]


def print_probe(path: str) -> None:
    header = ""
    restores: list[str] = []
    for line in [*read_lines(path), "# end"]:
        if line.startswith("#"):
            if header:
                print(f"  restores (ms): {', '.join(restores) or '-'}")
            header = line[1:].strip()
            restores = []
            if header != "end":
                print(header)
        elif line.startswith("{"):
            r = json.loads(line)
            print(f"  t/s per repetition: {', '.join(f'{x:.1f}' for x in r['samples_ts'])}")
        elif m := RESTORED.search(line):
            restores.append(m.group(1))


def print_steps(step_log: str, json_log: str) -> None:
    groups: list[list[tuple[float, float]]] = []
    for line in read_lines(step_log):
        if m := STEP.search(line):
            if int(m.group(2)) == 0:
                groups.append([])
            groups[-1].append((float(m.group(3)), float(m.group(4))))
    run = json_lines(json_log)[-1]
    n_timed = run["n_prompt"] // run["n_batch"]
    # the timed repetitions are the last groups of n_timed batches (llama-bench's warm-up run comes first)
    timed = [g for g in groups if len(g) == n_timed][-len(run["samples_ns"]) :]
    if len(timed) != len(run["samples_ns"]):
        sys.exit(f"{step_log}: {len(timed)} timed repetitions, {len(run['samples_ns'])} samples in {json_log}")
    print(f"{step_log}: {len(timed)} timed repetitions of {n_timed} batches")
    for i, (g, ns) in enumerate(zip(timed, run["samples_ns"], strict=True)):
        host = sum(h for h, _ in g)
        dev = sum(d for _, d in g)
        beyond = ns / 1e6 - host - dev
        print(f"  repetition {i + 1}: host {host:.1f} ms, device {dev:.1f} ms, beyond the batches {beyond:.1f} ms")


def main() -> int:
    print_probe(sys.argv[1])
    rest = sys.argv[2:]
    if len(rest) % 2:
        sys.exit("give each STEP_LOG with its JSON_LOG")
    for step_log, json_log in zip(rest[::2], rest[1::2], strict=True):
        print_steps(step_log, json_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
