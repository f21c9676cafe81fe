"""What machine a run happened on: CPU model and count, OS, and (when nvidia-smi is present) GPU, driver, CUDA.

Every stored run carries these fields; reports group by `hardware_key` so numbers from different machines are never
put side by side silently.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    cpu: str
    cpu_count: int
    os: str
    gpu_name: str
    gpu_count: int
    gpu_driver: str
    cuda_version: str
    memory_gib: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def hardware_key(self) -> str:
        """The identity of the hardware and driver stack (not the host name): equal keys give comparable numbers."""
        return hardware_key(self.cpu, self.gpu_name, self.gpu_driver, self.cuda_version)


def hardware_key(cpu: str, gpu_name: str, gpu_driver: str, cuda_version: str) -> str:
    gpu = f"{gpu_name} (driver {gpu_driver or '?'}, CUDA {cuda_version or '?'})" if gpu_name else "no GPU"
    return f"{cpu} / {gpu}"


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name from /proc/cpuinfo (x86 `model name`, arm `Model`/`CPU part`), else platform's."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match:
            return re.sub(r"\s+", " ", match.group(1)).strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def memory_gib() -> float:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0.0
    match = re.search(r"^MemTotal:\s*(\d+) kB", text, re.MULTILINE)
    return round(int(match.group(1)) / (1 << 20), 1) if match else 0.0


def parse_nvidia_smi(query_csv: str, banner: str) -> tuple[str, int, str, str]:
    """(GPU names joined by ' + ' when they differ, GPU count, driver, CUDA version) from nvidia-smi's output.

    `query_csv` is `nvidia-smi --query-gpu=name,driver_version --format=csv,noheader`; `banner` is plain `nvidia-smi`,
    whose header line says `CUDA Version: 12.8`.
    """
    names: list[str] = []
    drivers: list[str] = []
    for line in query_csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0]:
            names.append(parts[0])
            drivers.append(parts[1])
    unique = list(dict.fromkeys(names))
    match = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    return " + ".join(unique), len(names), (drivers[0] if drivers else ""), (match.group(1) if match else "")


def _nvidia() -> tuple[str, int, str, str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "", 0, "", ""
    try:
        query = subprocess.run(
            [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        banner = subprocess.run([smi], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "", 0, "", ""
    if query.returncode != 0:
        return "", 0, "", ""
    return parse_nvidia_smi(query.stdout, banner.stdout)


@functools.cache
def host_info() -> HostInfo:
    """This machine, probed once per process."""
    gpu, count, driver, cuda = _nvidia()
    return HostInfo(
        hostname=platform.node(),
        cpu=cpu_model(),
        cpu_count=usable_cpus(),
        os=platform.platform(),
        gpu_name=gpu,
        gpu_count=count,
        gpu_driver=driver,
        cuda_version=cuda,
        memory_gib=memory_gib(),
    )
