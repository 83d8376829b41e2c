"""torchopt.serve.ports: ports chosen below the kernel's ephemeral range, taken ones skipped, the kernel's own as the
fallback, and a port argument checked (type, range, in use) before a server starts."""

import random
import socket

import pytest

from torchopt.serve.ports import LINUX_DEFAULT_EPHEMERAL, LOWEST, check_port, ephemeral_range, free_ports, port_is_free


class Proposes:
    """An rng whose randrange returns the given ports in turn (then defers to a seeded one)."""

    def __init__(self, *ports: int) -> None:
        self.ports = list(ports)
        self.rest = random.Random(0)

    def randrange(self, low: int, high: int) -> int:
        return self.ports.pop(0) if self.ports else self.rest.randrange(low, high)


@pytest.fixture
def listener():
    """A socket listening on a port of the range free_ports draws from."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for port in free_ports(5):
            try:
                s.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        s.listen()
        yield s.getsockname()[1]


def test_ports_are_distinct_free_and_below_the_ephemeral_range():
    low, _ = ephemeral_range()
    ports = free_ports(3)
    assert len(set(ports)) == 3
    assert all(LOWEST <= p < low for p in ports), ports
    assert all(port_is_free(p) for p in ports)


def test_a_taken_port_and_a_repeat_are_skipped(listener):
    assert not port_is_free(listener)
    spare = free_ports(1, rng=Proposes(listener))[0]
    assert spare != listener and port_is_free(spare)
    p, q = free_ports(2)
    assert free_ports(2, rng=Proposes(p, p, q)) == [p, q]


def test_the_kernel_chooses_where_the_ephemeral_range_leaves_no_room(tmp_path):
    whole = tmp_path / "range"
    whole.write_text(f"{LOWEST + 5}\t65535\n")
    ports = free_ports(2, range_file=whole)
    assert len(set(ports)) == 2 and all(p >= ephemeral_range()[0] for p in ports), ports


def test_the_ephemeral_range_falls_back_to_linux_default(tmp_path):
    assert ephemeral_range(tmp_path / "missing") == LINUX_DEFAULT_EPHEMERAL
    (tmp_path / "garbled").write_text("32768")
    assert ephemeral_range(tmp_path / "garbled") == LINUX_DEFAULT_EPHEMERAL
    (tmp_path / "set").write_text("40000 50000\n")
    assert ephemeral_range(tmp_path / "set") == (40000, 50000)


@pytest.mark.parametrize(
    ("n", "error", "text"),
    [(0, ValueError, "n must be > 0, got 0"), ("2", TypeError, "n must be int, got str '2'")],
)
def test_a_bad_count_is_refused(n, error, text):
    with pytest.raises(error, match=text):
        free_ports(n)


def test_check_port_names_the_argument(listener):
    free = free_ports(1)[0]
    assert check_port(free, "127.0.0.1", "--port") == free
    with pytest.raises(ValueError, match=rf"--port {listener}: 127.0.0.1:{listener} is already in use"):
        check_port(listener, "127.0.0.1", "--port")
    with pytest.raises(ValueError, match=r"--port must be in \[1, 65535\], got 70000"):
        check_port(70000, "127.0.0.1", "--port")
    with pytest.raises(TypeError, match="--port must be int, got float 80.0"):
        check_port(80.0, "127.0.0.1", "--port")


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 in this Python")
def test_an_ipv6_host_is_checked_as_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    (port,) = free_ports(1, "::1")
    assert check_port(port, "::1", "--port") == port
