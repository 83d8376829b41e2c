"""TCP ports for the local servers torchopt starts (tritonserver's three, Ray Serve's HTTP proxy).

A port is chosen before the server that binds it starts, so another process can take it in between. A port from
`bind(0)` comes from the kernel's ephemeral range, and every outgoing connection and `bind(0)` of every other
process draws from that range as well: Ray's daemons, gRPC clients, another test suite's servers. `free_ports`
therefore picks at random between `LOWEST` and the start of that range. Nothing there is handed out by the
kernel, and Ray's worker ports (10002–19999) lie below it. Only a process that asks for the same number can take
it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from torchopt.config import check_positive, check_range

LOWEST = 20000  # above Ray's default worker ports (10002-19999)
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LINUX_DEFAULT_EPHEMERAL = (32768, 60999)
_TRIES = 200


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where the file is missing or unreadable)."""
    try:
        low, high = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        return LINUX_DEFAULT_EPHEMERAL
    return low, high


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `host:port` now. SO_REUSEADDR as servers set it: a port whose last
    connections linger in TIME_WAIT is free to them, one with a listener is not."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET  # an IPv6 literal, as Serve's proxy tells it


def _kernel_port(host: str) -> int:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(
    n: int, host: str = "127.0.0.1", *, rng: random.Random | None = None, range_file: Path = EPHEMERAL_RANGE_FILE
) -> list[int]:
    """`n` distinct TCP ports free on `host` now, below the ephemeral range where it leaves room (see the module
    docstring); from the kernel (`bind(0)`) where it does not, or where no free one turns up in a few hundred
    tries."""
    check_positive("n", n)
    rng = rng or random.Random()
    top = ephemeral_range(range_file)[0]
    chosen: list[int] = []
    for _ in range(_TRIES if top - LOWEST > 10 * n else 0):
        port = rng.randrange(LOWEST, top)
        if port not in chosen and port_is_free(port, host):
            chosen.append(port)
            if len(chosen) == n:
                return chosen
    while len(chosen) < n:
        port = _kernel_port(host)
        if port not in chosen:
            chosen.append(port)
    return chosen


def check_port(port: object, host: str, name: str) -> int:
    """`port` if it is a TCP port number that `host` can bind now; ValueError naming the argument `name`
    otherwise (a server started on a taken port fails only after its slow start, and less clearly)."""
    check_range(name, port, low=1, high=65535, types_=int)
    if not port_is_free(port, host):
        raise ValueError(f"{name} {port}: {host}:{port} is already in use or cannot be bound; choose another {name}")
    return port
