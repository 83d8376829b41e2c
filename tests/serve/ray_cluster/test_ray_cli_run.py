"""`python -m torchopt.serve.ray_cli`: starts its own local Ray, deploys, prints the endpoint, serves, and on
Ctrl-C shuts Serve and Ray down without leaving raylet / gcs_server behind.

It stays in this folder, collected before the tests that share the session's Ray, so that its own Ray never runs
next to that one; the CLI's one-line errors (no Ray) are in tests/serve/test_ray_cli.py."""

import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests
import torch

from torchopt.serve.ports import free_ports

WAIT_S = 180.0  # failure bound for the CLI's Ray start and deploy on a loaded 2-core machine


def _lines(stream) -> queue.Queue:
    """The stream's lines as they come, read on a thread (so waiting for one has a timeout)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue, text: str, seen: list[str]) -> str:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"no line with {text!r} within {WAIT_S} s; output so far: {''.join(seen)}")


@pytest.mark.slow
def test_cli_serves_prints_the_endpoint_and_leaves_no_ray_processes(artifact, mlp, ray_processes):
    ray_daemons, wait_gone = ray_processes
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "torchopt.serve.ray_cli", str(artifact), "--ray-cpus", "1", "--num-cpus", "0.5"]
    popen = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    with popen as proc:
        try:
            lines = _lines(proc.stdout)
            ready = _wait_for(lines, "ready in", seen)
            endpoint = ready.split(": ", 1)[1].strip()
            assert endpoint == f"http://127.0.0.1:{port}/mlp.torchopt"
            daemons = ray_daemons(psutil.Process(proc.pid).children(recursive=True))
            assert {p.name() for p in daemons} == {"raylet", "gcs_server"}, daemons
            x = torch.randn(16)
            answer = requests.post(endpoint, json=x.tolist(), timeout=60)
            assert answer.status_code == 200, answer.text
            torch.testing.assert_close(torch.tensor(answer.json()["outputs"]), mlp(x).detach(), rtol=1e-5, atol=1e-5)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=WAIT_S) == 0, "".join(seen)
            _wait_for(lines, "stopped: Serve and Ray shut down", seen)
        finally:
            if proc.poll() is None:
                proc.kill()
    left = wait_gone(daemons)
    assert not left, f"Ray processes left after the CLI stopped: {[(p.pid, p.name()) for p in left]}"
