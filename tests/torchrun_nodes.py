"""Several torchrun "nodes" on 127.0.0.1, for tests of the multi-node paths on one CPU machine.

Each node is one ``python -m torch.distributed.run`` process with static rendezvous (``--nnodes``, ``--node-rank``,
``--master-addr 127.0.0.1``), started in its own session so that a test can kill a whole node (the agent and its
workers) at once, as a machine failure would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# One thread per process: four ranks on a 2-core machine would otherwise fight over the cores.
NODE_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(command: Sequence[str], *, nnodes: int, nproc_per_node: int, cwd: Path) -> list[subprocess.Popen]:
    """Start ``nnodes`` torchrun nodes running ``command`` (a script path or ``-m module`` and its arguments)."""
    port = free_port()
    nodes = []
    for node_rank in range(nnodes):
        launcher = [
            sys.executable,
            *("-m", "torch.distributed.run"),
            *(f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--nproc-per-node={nproc_per_node}"),
            *("--master-addr=127.0.0.1", f"--master-port={port}", "--max-restarts=0"),
        ]
        log = open(cwd / f"node{node_rank}.log", "wb")  # noqa: SIM115 (closed with the process by wait_nodes)
        nodes.append(
            subprocess.Popen(
                [*launcher, *command],
                cwd=cwd,
                env=NODE_ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return nodes


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node's whole session (its torchrun agent and every worker), as a machine failure would."""
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    node.wait()


def wait_until(condition: Callable[[], bool], *, nodes: Sequence[subprocess.Popen], timeout: float) -> None:
    """Poll ``condition`` until it holds; fail if it does not within ``timeout`` or a node exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if any(node.poll() is not None for node in nodes):
            raise AssertionError(f"a node exited (codes {[node.poll() for node in nodes]}) before the condition held")
        if time.monotonic() > deadline:
            raise AssertionError(f"the condition did not hold within {timeout} s")
        time.sleep(0.02)


def wait_nodes(nodes: Sequence[subprocess.Popen], *, cwd: Path, timeout: float) -> list[int]:
    """Wait for every node (killing all of them past ``timeout``); return their exit codes."""
    deadline = time.monotonic() + timeout
    for node in nodes:
        try:
            node.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in nodes:
                kill_node(other)
            raise AssertionError(f"nodes still running after {timeout} s:\n{node_logs(cwd)}") from None
    return [node.returncode for node in nodes]


def node_logs(cwd: Path) -> str:
    return "\n".join(
        f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}" for path in sorted(cwd.glob("node*.log"))
    )
