"""`torchopt export-triton` and `torchopt serve`: a repository written from the command line, a refusal in one
line, and the real tritonserver answering the smoke run (the CLI starts its own server; nothing else here does)."""

import importlib.util

import pytest

from torchopt.cli import main
from torchopt.kernels import PreprocessConfig
from torchopt.serve.triton_repo import export_triton

pytest.importorskip(
    "tritonclient.grpc", reason="the serve extra (tritonclient) is not installed; .ci/setup installs it"
)


def test_cli_export_and_one_line_refusal(saved_tiny, tmp_path, capsys):
    _, saved = saved_tiny
    assert main(["export-triton", str(saved), "--repo", str(tmp_path / "r"), "--name", "tiny", "--no-warmup"]) == 0
    assert "serve it: torchopt serve" in capsys.readouterr().out
    assert "model_warmup" not in (tmp_path / "r" / "tiny" / "config.pbtxt").read_text()
    code = main(["export-triton", str(saved), "--repo", str(tmp_path / "r2"), "--max-batch-size", "64"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "max_batch_size 64 is above the batch max 16" in err


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None,  # its package __init__ needs PyTriton's own deps: only look it up
    reason="the serve extra (nvidia-pytriton --no-deps) is not installed; .ci/setup installs it",
)
def test_cli_serve_smoke(saved_tiny, tmp_path, capsys):
    _, saved = saved_tiny
    export_triton(saved, tmp_path / "repo", name="tiny", preprocess=PreprocessConfig(), frame_size=(20, 30))
    assert main(["serve", str(tmp_path / "repo"), "--smoke", "200", "--concurrency", "16"]) == 0
    out = capsys.readouterr().out
    assert "ready in" in out and "HTTP http://127.0.0.1:" in out
    assert "smoke tiny_ensemble: 200/200 answers from 16 concurrent clients, all match" in out


@pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None,
    reason="the serve extra (nvidia-pytriton --no-deps) is not installed; .ci/setup installs it",
)
def test_cli_serve_of_a_damaged_artifact_is_one_line_naming_the_file(saved_tiny, tmp_path, capsys):
    _, saved = saved_tiny
    export_triton(saved, tmp_path / "repo", name="tiny")
    (tmp_path / "repo" / "tiny" / "1" / "artifact" / "module.pt2").write_bytes(b"garbage")
    code = main(["serve", str(tmp_path / "repo")])
    started, error = capsys.readouterr().err.splitlines()  # the progress line, then the refusal in one line
    assert code != 0 and started.startswith("starting tritonserver on ")
    assert "model 'tiny' failed to load: '" in error and "module.pt2' is damaged: it is not the zip archive" in error
