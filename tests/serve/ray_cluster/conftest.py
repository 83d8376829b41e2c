"""One local Ray (2 CPUs) and Serve for every Ray test of the run (the model they serve, `artifact`, comes from
tests/serve/conftest.py).

Ray is the optional extra `torchopt-infer[ray]` (CI installs it); without it these tests skip with the reason.
Ray 2.60 turns token authentication on by default: a local `ray.init` generates the token itself
(~/.ray/auth_token), which the tests keep (no opt-out). HTTP goes to 127.0.0.1 on a free port only.
"""

import time

import psutil
import pytest

from torchopt.serve.ports import free_ports

ray = pytest.importorskip("ray", reason="Ray is the optional extra torchopt-infer[ray] (pip install 'ray[serve,data]')")

# Ray's own daemons: none may outlive a shutdown.
RAY_DAEMONS = ("raylet", "gcs_server")
# Failure bound for anything the tests wait for over HTTP or on Ray; never reached when the code works.
WAIT_S = 120.0


def ray_daemons(processes) -> list[psutil.Process]:
    """The raylet / gcs_server processes among `processes` that are still running."""
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and p.name() in RAY_DAEMONS:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_gone(processes, timeout_s: float = 30.0) -> list[psutil.Process]:
    """Wait (bounded) for Ray's daemons among `processes` to exit; returns those still running."""
    deadline = time.monotonic() + timeout_s
    while ray_daemons(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray_daemons(processes)


@pytest.fixture(scope="session")
def ray_processes():
    """`ray_daemons` and `wait_gone` for tests that start a Ray of their own (test modules cannot import conftest)."""
    return ray_daemons, wait_gone


@pytest.fixture(scope="session")
def ray_serve():
    """A local Ray with 2 CPUs and Serve's HTTP proxy on 127.0.0.1:<free port>; shut down at the end of the run,
    after which none of its raylet / gcs_server processes may remain."""
    from ray import serve

    (port,) = free_ports(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    daemons = ray_daemons(psutil.Process().children(recursive=True))
    assert {p.name() for p in daemons} == set(RAY_DAEMONS), f"ray.init started {daemons}, expected {RAY_DAEMONS}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    left = wait_gone(daemons)
    assert not left, f"Ray processes left after shutdown: {[(p.pid, p.name()) for p in left]}"
