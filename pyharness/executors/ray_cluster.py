"""Joining Ray: a local instance, or a running cluster by address; the cluster's alive nodes.

Imported only by the Ray executor (it imports `ray`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyharness.errors import HarnessError
from pyharness.executors.worker import NodeIdentity

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised through executors.make_executor
    raise HarnessError(
        "--executor ray needs the ray package, which is not installed",
        "pip install 'pyharness[cluster]' (or pip install ray) on the driver and every node",
    ) from exc

DEFAULT_PORT = 6379  # `ray start --head` listens here unless --port says otherwise
CONNECT_TIMEOUT_S = 5.0
JOIN_FIX = (
    "start the cluster's head with `ray start --head --port=6379` and pass --address HEAD_HOST:6379 (or `auto` on "
    "a node of the cluster), or leave --address out to start a local Ray instance"
)


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS address `host[:port]` (also under ray://); None for `auto`/`local`."""
    if address in ("auto", "local"):
        return None
    bare = address.removeprefix("ray://")
    host, sep, port = bare.rpartition(":")
    if not sep:
        return bare, DEFAULT_PORT
    try:
        return host.strip("[]"), int(port)
    except ValueError as exc:
        raise HarnessError(
            f"Ray address {address!r} has no valid port", "write HOST:PORT, e.g. head-node:6379"
        ) from exc


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, not minutes, when nothing listens at the address."""
    target = split_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise HarnessError(f"cannot reach the Ray cluster at {address}: {why}", JOIN_FIX) from exc


@contextmanager
def ray_session(
    address: str | None,
    *,
    num_cpus: int | None = None,
    resources: dict[str, float] | None = None,
    verbose: bool = False,
) -> Iterator[bool]:
    """Connected to Ray for the block: `address` None starts a local instance (shut down after; `num_cpus` and
    custom `resources` are its own), `auto` or HOST:PORT joins a running cluster (disconnected after). Yields
    whether this call started the connection; a caller already connected (ray.init done elsewhere) keeps it."""
    if ray.is_initialized():
        yield False
        return
    if address:
        check_reachable(address)
    try:
        if address is None:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                resources=resources or None,
                include_dashboard=False,
                log_to_driver=verbose,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=address, log_to_driver=verbose, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise HarnessError(f"cannot join {where}: {exc}", JOIN_FIX) from exc
    try:
        yield True
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class RayNode:
    node_id: str
    hostname: str
    resources: dict[str, float]

    def label(self) -> str:
        return NodeIdentity(self.node_id, self.hostname).label()


def alive_nodes() -> list[RayNode]:
    nodes = [
        RayNode(node_id=n["NodeID"], hostname=n.get("NodeManagerHostname", "?"), resources=dict(n["Resources"]))
        for n in ray.nodes()
        if n.get("Alive")
    ]
    if not nodes:
        raise HarnessError("the Ray cluster has no alive node", JOIN_FIX)
    return nodes
