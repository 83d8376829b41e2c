"""Run the real Triton Inference Server on a model repository, and send checked requests to it.

The server is the `tritonserver` 2.51 bundled with the `nvidia-pytriton` wheel (Python backend only; CPU and
GPU, no container). `TritonServer` prepares what PyTriton prepares before starting it: a private backend folder
holding the Python-backend stub built for the running Python, ``LD_LIBRARY_PATH`` with this interpreter's
``LIBDIR`` first (the stub links the first ``libpython3.x.so`` the loader finds; under a pyenv/venv/uv/conda
Python that is another installation's, and model init dies with ``'_thread.RLock' object has no attribute
'_recursion_count'``) and the wheel's own libraries, and ``TORCHOPT_TRITON_SITE_DIRS`` so `triton_model.py` sees
this environment's packages. It listens on 127.0.0.1 only, on free ports, runs in its own process group (the
stubs die with it) and shuts down with a short exit timeout.

    with TritonServer("model_repository") as server:
        result = smoke_test(server, "resnet", reference=model, make_input=..., requests=1000)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from torchopt.serve._common import percentile
from torchopt.serve.ports import free_ports
from torchopt.serve.triton_repo import damaged_models

__all__ = [
    "INSTALL_HINT",
    "ServeExtraMissing",
    "SmokeResult",
    "TritonServer",
    "TritonServerError",
    "find_tritonserver",
    "smoke_test",
]

INSTALL_HINT = "pip install 'torchopt-infer[serve]' && pip install --no-deps nvidia-pytriton==0.7.0"
_LOG_TAIL_LINES = 40


class ServeExtraMissing(ImportError):
    """The bundled tritonserver or tritonclient is not installed (the `serve` extra)."""


SHARED_MEMORY = Path("/dev/shm")


def _remove_shared_memory(prefix: str) -> None:
    """Unlink the Python backend's regions a server left: a killed server or stub never unlinks its own, and each
    holds its default 1 MiB of the machine's memory until reboot. The prefix is unique to one server."""
    for region in SHARED_MEMORY.glob(f"{prefix}*"):
        with contextlib.suppress(FileNotFoundError):
            region.unlink()


class TritonServerError(RuntimeError):
    """The server did not start, a model did not load, or the server died while serving."""


def _remove_tree(path: Path) -> None:
    """Remove a folder; stubs killed with the server can still be writing __pycache__ for a moment, which makes
    one rmtree leave it behind, so retry for up to two seconds."""
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.1)


def find_tritonserver() -> Path:
    """The `tritonserver` binary bundled with nvidia-pytriton; ServeExtraMissing naming the install otherwise."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ServeExtraMissing(
            f"the bundled Triton Inference Server (nvidia-pytriton) is not installed: {INSTALL_HINT}"
        )
    binary = Path(spec.origin).parent / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServeExtraMissing(f"{binary} is missing (a damaged nvidia-pytriton install?): {INSTALL_HINT}")
    return binary


def _site_dirs() -> list[str]:
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


class TritonServer:
    """A `tritonserver` process serving `repo` on 127.0.0.1; a context manager (start on enter, stop on exit).

    ready_timeout_s: how long `start` waits for every model to load before it stops the server and raises.
    exit_timeout_s: the server's own shutdown wait for in-flight requests (Triton's default is 30 s).
    """

    def __init__(
        self,
        repo: str | os.PathLike,
        *,
        ready_timeout_s: float = 180.0,
        exit_timeout_s: int = 2,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ValueError(f"repo {str(repo)!r} is not a directory (a model repository written by export-triton)")
        self.ready_timeout_s = ready_timeout_s
        self.exit_timeout_s = exit_timeout_s
        # Three distinct ports (three bind(0) calls may return one port twice), away from the ephemeral range.
        given = {p for p in (http_port, grpc_port, metrics_port) if p}
        spare = iter([p for p in free_ports(3 + len(given)) if p not in given])
        self.http_port = http_port or next(spare)
        self.grpc_port = grpc_port or next(spare)
        self.metrics_port = metrics_port or next(spare)
        # Unique per server: names the Python backend's shared-memory regions of this server (see start, stop).
        self.shm_prefix = f"torchopt_{os.getpid()}_{uuid.uuid4().hex[:12]}_"
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._workdir: Path | None = None
        self._log_file: Any = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path | None:
        return None if self._workdir is None else self._workdir / "tritonserver.log"

    def _prepare_backends(self, binary: Path) -> tuple[Path, dict[str, str]]:
        """A backend folder with the stub for this Python, and the environment the server and stubs need."""
        root = binary.parent.parent  # pytriton/tritonserver
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServeExtraMissing(f"nvidia-pytriton has no Python-backend stub for Python {version} ({stub})")
        backends = self._workdir / "backends"
        shutil.copytree(root / "backends", backends)
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        bundled = root.parent.parent / "nvidia_pytriton.libs"
        paths = [libdir, str(bundled), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
        env["TORCHOPT_TRITON_SITE_DIRS"] = os.pathsep.join(_site_dirs())
        env.pop("TRITON_INTERPRET", None)  # a test/debug knob: a server runs the preprocess kernel or its reference
        return backends, env

    def start(self) -> TritonServer:
        """Start the server and wait until it and all its models are ready; TritonServerError otherwise (a
        torchopt model whose saved module is missing or damaged is refused before anything starts)."""
        binary = find_tritonserver()
        problems = damaged_models(self.repo)
        if problems:
            raise TritonServerError(
                "; ".join(f"model {name!r} failed to load: {why}" for name, why in problems.items())
            )
        self._workdir = Path(tempfile.mkdtemp(prefix="torchopt-triton-"))
        backends, env = self._prepare_backends(binary)
        cmd = [
            str(binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--strict-readiness=true",
            "--log-verbose=0",
            # The Python backend's shared-memory regions are named prefix + a UUID. A prefix of this server's own
            # tells its regions from every other server's (Triton's advice for servers side by side), so that
            # stop() can unlink the ones a killed server or stub leaves.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        t0 = time.perf_counter()
        # A new session: stopping signals the whole group, so the Python-backend stubs never outlive the server.
        self.process = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            self._wait_ready()
        except BaseException:
            # A failed start never reaches __exit__: stop the server and remove the backend copy here; the log
            # stays where the error says (the only file left behind).
            self.stop()
            _remove_tree(self._workdir / "backends")
            raise
        self.startup_seconds = time.perf_counter() - t0
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {self.process.returncode} while loading {self.repo}:"
                    f" {self.failure_summary()}"
                )
            url = f"http://{self.http_url}/v2/health/ready"
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
                urllib.request.urlopen(url, timeout=1) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.1)
        raise TritonServerError(
            f"tritonserver did not become ready within {self.ready_timeout_s:g} s: {self.failure_summary()}"
        )

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def failure_summary(self) -> str:
        """The server log's model-load failures and errors, in a few lines (the whole log is at log_path)."""
        text = self.log_text()
        failures = re.findall(r"failed to load '([^']+)' version \d+: (.*)", text)
        if failures:
            return "; ".join(f"model {name!r} failed to load: {why.rstrip(chr(34))}" for name, why in failures)
        errors = [ln for ln in text.splitlines() if ln.startswith("E") or "error" in ln.lower()]
        errors = [ln for ln in errors if "NVML" not in ln and "DCGM" not in ln and "CudaDriver" not in ln]
        tail = errors[-5:] or text.splitlines()[-_LOG_TAIL_LINES:]
        return " | ".join(ln.strip() for ln in tail) + f" (log: {self.log_path})"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise TritonServerError(
                f"tritonserver (pid {self.process.pid}) exited with code {self.process.returncode} while serving"
                f" {self.repo}; log: {self.log_path}"
            )

    def stop(self) -> None:
        """Interrupt the server's process group, wait its exit timeout plus a grace period, then kill it."""
        proc, self.process = self.process, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.exit_timeout_s + 5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # stubs left in the group, or a server that did not exit
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            self._dead_process = proc
            _remove_shared_memory(self.shm_prefix)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        """Remove the private backend folder and the log (stop first)."""
        if self._workdir is not None:
            _remove_tree(self._workdir)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()

    def client(self) -> Any:
        """A `tritonclient.grpc.InferenceServerClient` for this server."""
        grpcclient = _grpcclient()
        return grpcclient.InferenceServerClient(self.grpc_url)

    def batch_sizes(self, model: str) -> dict[int, int]:
        """Batch size → how many executions of that size the server ran for `model` (its own statistics)."""
        stats = self.client().get_inference_statistics(model_name=model, as_json=True)
        out: dict[int, int] = {}
        for entry in stats.get("model_stats", []):
            for b in entry.get("batch_stats", []):
                out[int(b["batch_size"])] = out.get(int(b["batch_size"]), 0) + int(b["compute_infer"].get("count", 0))
        return dict(sorted(out.items()))


def _grpcclient() -> Any:
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as exc:
        raise ServeExtraMissing(f"tritonclient is not installed ({exc}): {INSTALL_HINT}") from exc
    return grpcclient


@dataclasses.dataclass
class SmokeResult:
    """What `smoke_test` saw: answers checked, mismatches, latency percentiles, throughput, server batch sizes."""

    requests: int
    concurrency: int
    answered: int
    mismatches: list[str]
    latency_ms: dict[str, float]
    seconds: float
    batch_sizes: dict[int, int]

    @property
    def requests_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lat = ", ".join(f"{k} {v:.2f} ms" for k, v in self.latency_ms.items())
        batches = ", ".join(f"{b}×{n}" for b, n in self.batch_sizes.items()) or "none"
        verdict = "all match" if not self.mismatches else f"{len(self.mismatches)} MISMATCHED"
        return (
            f"{self.answered}/{self.requests} answers from {self.concurrency} concurrent clients, {verdict};"
            f" latency {lat}; {self.requests_per_s:,.0f} requests/s over {self.seconds:.2f} s (one run, CPU"
            f" load not controlled); server batches (size×count): {batches}"
        )


def smoke_test(
    server: TritonServer,
    model: str,
    *,
    make_inputs: Callable[[int], dict[str, torch.Tensor]],
    reference: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    requests: int = 1000,
    concurrency: int = 32,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    timeout_s: float = 60.0,
) -> SmokeResult:
    """Send `requests` requests from `concurrency` threads (request i has inputs `make_inputs(i)`, batch dims
    included) and compare every answer with `reference(inputs)` (output name → tensor) within atol/rtol.

    Each request's inputs differ, so a lost, swapped or duplicated answer shows as a mismatch. A server that
    dies mid-run raises TritonServerError (each request has a client timeout; nothing waits forever).
    """
    grpcclient = _grpcclient()
    from tritonclient.utils import InferenceServerException

    local = threading.local()
    before = server.batch_sizes(model)

    def one(i: int) -> tuple[float, str | None]:
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(server.grpc_url)
        inputs = make_inputs(i)
        infer_inputs = _infer_inputs(grpcclient, inputs)
        t0 = time.perf_counter()
        try:
            result = local.client.infer(model, infer_inputs, client_timeout=timeout_s)
        except InferenceServerException as exc:
            server.check_alive()
            if not server.alive():
                raise TritonServerError(f"tritonserver died during the smoke test: {exc}") from exc
            return time.perf_counter() - t0, f"request {i}: {exc}"
        elapsed = time.perf_counter() - t0
        return elapsed, _mismatch(i, result, reference(inputs), atol, rtol)

    t0 = time.perf_counter()
    latencies, mismatches, answered = [], [], 0
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for elapsed, problem in pool.map(one, range(requests)):
            latencies.append(elapsed)
            answered += problem is None or " output " in problem  # an answer came back (right or wrong)
            if problem:
                mismatches.append(problem)
    seconds = time.perf_counter() - t0
    after = server.batch_sizes(model)
    batches = {b: n - before.get(b, 0) for b, n in after.items() if n - before.get(b, 0) > 0}
    lat = {f"p{q}": percentile(latencies, q) * 1e3 for q in (50, 90, 99)}
    return SmokeResult(requests, concurrency, answered, mismatches, lat, seconds, batches)


def _infer_inputs(grpcclient: Any, inputs: dict[str, torch.Tensor]) -> list[Any]:
    infer_inputs = []
    for name, t in inputs.items():
        arr = t.numpy()
        inp = grpcclient.InferInput(name, list(arr.shape), _triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        infer_inputs.append(inp)
    return infer_inputs


def _mismatch(i: int, result: Any, expected: dict[str, torch.Tensor], atol: float, rtol: float) -> str | None:
    """What differs between request `i`'s answer and the expected outputs (None: every output within atol/rtol)."""
    for name, want in expected.items():
        got = torch.from_numpy(result.as_numpy(name).copy())
        if got.shape != want.shape or not torch.allclose(got, want.to(got.dtype), atol=atol, rtol=rtol):
            err = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
            return f"request {i} output {name!r}: shape {tuple(got.shape)}, max abs error {err:.3g}"
    return None


def _triton_dtype(np_dtype: Any) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(np_dtype)
