"""The real tritonserver (bundled with nvidia-pytriton) on repositories written by export_triton. No mock."""

import importlib.util
import os
import shutil
import signal
import threading
import zipfile

import numpy as np
import pytest
import torch

import torchopt
from torchopt.kernels import PreprocessConfig, preprocess_ref
from torchopt.serve.triton_repo import export_triton
from torchopt.serve.triton_server import SHARED_MEMORY, TritonServer, TritonServerError, smoke_test

pytest.importorskip(
    "tritonclient.grpc", reason="the serve extra (tritonclient) is not installed; .ci/setup installs it"
)
if importlib.util.find_spec("pytriton") is None:  # its package __init__ needs PyTriton's own deps: only look it up
    pytest.skip(
        "the serve extra (nvidia-pytriton --no-deps) is not installed; .ci/setup installs it", allow_module_level=True
    )

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TOL = dict(atol=1e-5, rtol=1e-5)  # eager-fp32: the server runs the same float32 module


@pytest.fixture(scope="module")
def served(saved_tiny, tmp_path_factory):
    model, saved = saved_tiny
    repo = tmp_path_factory.mktemp("repo")
    export_triton(saved, repo, name="tiny", preprocess=PreprocessConfig(), max_queue_delay_us=2000)
    with TritonServer(repo, exit_timeout_s=1) as server:
        yield model, server


def _x(i):
    return {"x": torch.randn(1 + i % 3, 3, 8, 8, generator=torch.Generator().manual_seed(i))}


def _eager(model):
    def reference(inputs):
        with torch.inference_mode():
            return {"output": model(inputs["x"])}

    return reference


def test_thousand_requests_from_32_clients_match_eager_and_batch(served):
    model, server = served
    result = smoke_test(server, "tiny", make_inputs=_x, reference=_eager(model), requests=1000, concurrency=32, **TOL)
    assert result.mismatches == [] and result.answered == 1000
    assert max(result.batch_sizes) > 1, result.batch_sizes
    assert sum(b * n for b, n in result.batch_sizes.items()) == sum(1 + i % 3 for i in range(1000))  # rows: none lost
    print(result.summary())


def test_ensemble_takes_uint8_frames(served):
    model, server = served

    def frames(i):
        g = torch.Generator().manual_seed(i)
        return {"frames": torch.randint(0, 256, (1, 20, 30, 3), generator=g, dtype=torch.uint8)}

    def reference(inputs):
        with torch.inference_mode():
            return {"output": model(preprocess_ref(inputs["frames"], (8, 8)))}

    result = smoke_test(
        server, "tiny_ensemble", make_inputs=frames, reference=reference, requests=64, concurrency=8, **TOL
    )
    assert result.mismatches == [] and result.answered == 64


def _infer(server, name, array):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inp = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    inp.set_data_from_numpy(array)
    return server.client().infer("tiny", [inp], client_timeout=30)


def test_batch_above_max_and_wrong_shape_or_dtype_are_refused(served):
    from tritonclient.utils import InferenceServerException

    _, server = served
    with pytest.raises(InferenceServerException, match="batch-size must be <= 16 for .tiny."):
        _infer(server, "x", np.zeros((17, 3, 8, 8), np.float32))
    with pytest.raises(InferenceServerException, match=r"unexpected shape for input 'x'"):
        _infer(server, "x", np.zeros((1, 3, 9, 8), np.float32))
    with pytest.raises(
        InferenceServerException, match="input 'x' data-type is 'FP64', but model 'tiny' expects 'FP32'"
    ):
        _infer(server, "x", np.zeros((1, 3, 8, 8), np.float64))


def _regions(server):
    return list(SHARED_MEMORY.glob(f"{server.shm_prefix}*"))


def _answers_all(server, model, requests):
    reference = _eager(model)
    result = smoke_test(server, "tiny", make_inputs=_x, reference=reference, requests=requests, concurrency=8, **TOL)
    assert result.mismatches == [] and result.answered == requests


def test_two_servers_side_by_side_keep_their_shared_memory_apart(served, saved_tiny, tmp_path):
    """Each server names its Python-backend shared-memory regions with its own prefix, so a server stopping
    unlinks its own regions only and the other one keeps serving."""
    model, first = served
    export_triton(saved_tiny[1], tmp_path / "repo", name="tiny")
    with TritonServer(tmp_path / "repo", exit_timeout_s=1) as second:
        assert first.shm_prefix != second.shm_prefix
        for server in (first, second, first):
            _answers_all(server, model, 64)
        assert _regions(first) and _regions(second)  # each server's regions under its own prefix
    assert not _regions(second)  # unlinked when it stopped
    _answers_all(first, model, 16)  # and the first one is untouched


def test_server_killed_mid_run_is_reported(saved_tiny, tmp_path):
    model, saved = saved_tiny
    export_triton(saved, tmp_path / "repo", name="tiny")
    server = TritonServer(tmp_path / "repo", exit_timeout_s=1).start()
    try:
        killer = threading.Timer(0.5, lambda: os.killpg(server.process.pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(TritonServerError, match="tritonserver"):
            smoke_test(
                server, "tiny", make_inputs=_x, reference=_eager(model), requests=100_000, concurrency=8, timeout_s=10
            )
    finally:
        server.stop()
        server.cleanup()
    assert not _regions(server)  # a killed server's shared memory is unlinked by stop()


def _assert_failed_start_left_only_its_log(server):
    """A failed start stops the server and removes its backend copy; only the log the error names stays."""
    assert not server.alive() and server.log_path.is_file()
    workdir = server.log_path.parent
    assert sorted(p.name for p in workdir.iterdir()) == [server.log_path.name]
    server.cleanup()
    assert not workdir.exists()


def test_damaged_artifact_fails_naming_the_file(saved_tiny, tmp_path):
    _, saved = saved_tiny
    export_triton(saved, tmp_path / "repo", name="tiny")
    (tmp_path / "repo" / "tiny" / "1" / "artifact" / "module.pt2").write_bytes(b"garbage")
    server = TritonServer(tmp_path / "repo", exit_timeout_s=1)
    with pytest.raises(TritonServerError, match=r"model 'tiny' failed to load: '.*module\.pt2' is damaged"):
        server.start()
    assert server.process is None and server.log_path is None  # refused before anything started


def test_a_model_failing_inside_the_server_stops_it_and_leaves_only_its_log(saved_tiny, tmp_path):
    """A module file that passes the pre-start check (a zip archive) but is no exported program: the stub's load
    fails inside the server. tritonserver then reports the model as failed, or on a loaded machine may abort
    (exit -6); either way the start fails, the server is stopped and only its log stays."""
    _, saved = saved_tiny
    export_triton(saved, tmp_path / "repo", name="tiny")
    with zipfile.ZipFile(tmp_path / "repo" / "tiny" / "1" / "artifact" / "module.pt2", "w") as archive:
        archive.writestr("junk", "not an exported program")
    server = TritonServer(tmp_path / "repo", exit_timeout_s=1)
    with pytest.raises(TritonServerError, match=r"model 'tiny' failed to load|tritonserver exited with code"):
        server.start()
    _assert_failed_start_left_only_its_log(server)


def test_missing_artifact_fails_naming_the_file(saved_tiny, tmp_path):
    _, saved = saved_tiny
    export_triton(saved, tmp_path / "repo", name="tiny")
    shutil.rmtree(tmp_path / "repo" / "tiny" / "1" / "artifact")
    server = TritonServer(tmp_path / "repo", exit_timeout_s=1)
    with pytest.raises(TritonServerError, match=r"model 'tiny' failed to load: path '.*artifact' is not a saved"):
        server.start()
    assert server.process is None and server.log_path is None


class TokenEncoder(torch.nn.Module):
    """Token ids -> the mean of their embeddings: any id outside [0, 50) raises IndexError."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 8)

    def forward(self, ids):
        return self.embed(ids).mean(1)


def test_token_id_model_loads_warms_up_and_serves(tmp_path):
    # Triton's random warm-up data for an int64 input are ids out of the embedding's range; the failing warm-up
    # crashed tritonserver 2.51 while loading (exit -11). The export writes a sample from the value range.
    model = TokenEncoder().eval()
    spec = torchopt.InputSpec("ids", dtype="int64", min=(1, 6), opt=(4, 6), max=(8, 6), value_range=(0, 50))
    fast = torchopt.optimize(model, "eager-fp32", inputs=[spec], device="cpu")
    export_triton(fast, tmp_path / "repo", name="tokens")
    with TritonServer(tmp_path / "repo", exit_timeout_s=1) as server:
        res = smoke_test(
            server,
            "tokens",
            make_inputs=lambda i: {"ids": torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(i))},
            reference=lambda inputs: {"output": model(inputs["ids"])},
            requests=64,
            concurrency=8,
            **TOL,
        )
    assert res.answered == 64 and not res.mismatches
