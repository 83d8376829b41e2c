"""export_triton: the files of a model repository, checked before anything is written."""

import json
import shutil

import numpy as np
import pytest
import torch

import torchopt
from torchopt.kernels import PreprocessConfig
from torchopt.saving import DamagedSaveError
from torchopt.serve.triton_config import TritonConfigError, parse_model_config
from torchopt.serve.triton_repo import damaged_models, export_triton

pytest.importorskip(
    "tritonclient.grpc", reason="the serve extra (tritonclient) is not installed; .ci/setup installs it"
)


def test_python_backend_repository(saved_tiny, tmp_path):
    _, saved = saved_tiny
    export = export_triton(saved, tmp_path / "repo", name="tiny", max_queue_delay_us=300, instance_count=2)
    model = tmp_path / "repo" / "tiny"
    assert (model / "1" / "model.py").is_file()
    assert (model / "1" / "artifact" / "meta.json").is_file()
    proto = parse_model_config((model / "config.pbtxt").read_text(), "tiny")
    assert proto.backend == "python" and proto.max_batch_size == 16 == export.max_batch_size
    assert list(proto.input[0].dims) == [3, 8, 8] and list(proto.output[0].dims) == [5]
    assert proto.dynamic_batching.max_queue_delay_microseconds == 300
    assert list(proto.dynamic_batching.preferred_batch_size) == []  # only for TensorRT with several profiles
    assert proto.instance_group[0].count == 2 and proto.model_warmup[0].batch_size == 4
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "torchopt serve" in readme and "torch " in readme
    assert "profile_models" in (tmp_path / "repo" / "model_analyzer.yaml").read_text()


def test_latency_budget_sets_queue_delay_from_saved_measurement(saved_tiny, tmp_path):
    _, saved = saved_tiny
    after = json.loads((saved / "meta.json").read_text())["report"]["latency_after"]
    export = export_triton(saved, tmp_path / "repo", latency_budget_ms=after["p99_ms"] * 20)
    full_batch = after["p99_ms"] * export.max_batch_size / after["batch_size"]  # scaled from the measured batch
    assert abs(export.queue_delay_us - (after["p99_ms"] * 20 - 2 * full_batch) * 1000) <= 1
    analyzer = (tmp_path / "repo" / "model_analyzer.yaml").read_text()
    assert "perf_latency_p99" in analyzer


def test_ensemble_with_preprocess(saved_tiny, tmp_path):
    _, saved = saved_tiny
    export = export_triton(saved, tmp_path / "repo", name="tiny", preprocess=PreprocessConfig(), frame_size=(20, 30))
    assert export.ensemble == "tiny_ensemble"
    ens = parse_model_config((tmp_path / "repo" / "tiny_ensemble" / "config.pbtxt").read_text(), "ens")
    assert ens.platform == "ensemble" and list(ens.input[0].dims) == [20, 30, 3]
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["tiny_preprocess", "tiny"]
    assert (tmp_path / "repo" / "tiny_ensemble" / "1").is_dir()  # Triton needs the version folder
    pre = parse_model_config((tmp_path / "repo" / "tiny_preprocess" / "config.pbtxt").read_text(), "pre")
    from tritonclient.grpc import model_config_pb2

    assert pre.input[0].data_type == model_config_pb2.TYPE_UINT8
    assert json.loads(pre.parameters["size"].string_value) == [8, 8]


def test_tensorrt_plan_config(saved_tiny, tmp_path):
    _, saved = saved_tiny
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"not really an engine")
    export_triton(saved, tmp_path / "repo", platform="tensorrt_plan", artifact=plan, cuda_graphs=True)
    proto = parse_model_config((tmp_path / "repo" / "model" / "config.pbtxt").read_text(), "m")
    assert proto.platform == "tensorrt_plan" and proto.optimization.cuda.graphs
    assert proto.instance_group[0].kind == proto.instance_group[0].KIND_GPU
    assert (tmp_path / "repo" / "model" / "1" / "model.plan").read_bytes() == b"not really an engine"
    assert "same TensorRT version" in (tmp_path / "repo" / "README.md").read_text()


def test_refusals_write_nothing(saved_tiny, tmp_path):
    _, saved = saved_tiny
    repo = tmp_path / "repo"
    with pytest.raises(TritonConfigError, match="max_batch_size 64 is above the batch max 16"):
        export_triton(saved, repo, max_batch_size=64)
    with pytest.raises(TritonConfigError, match="only read by the TensorRT backend"):
        export_triton(saved, repo, cuda_graphs=True)
    with pytest.raises(TritonConfigError, match="preferred_batch_sizes only pays"):
        export_triton(saved, repo, preferred_batch_sizes=[4])
    with pytest.raises(ValueError, match=r"platform 'torch_aoti' needs artifact="):
        export_triton(saved, repo, platform="torch_aoti")
    with pytest.raises(ValueError, match="unknown key 'max_batch'"):
        export_triton(saved, repo, max_batch=4)
    assert not repo.exists() or list(repo.iterdir()) == []


def test_existing_model_needs_overwrite(saved_tiny, tmp_path):
    _, saved = saved_tiny
    export_triton(saved, tmp_path / "repo")
    with pytest.raises(FileExistsError, match=r"model folders \['model'\] exist already"):
        export_triton(saved, tmp_path / "repo")
    export_triton(saved, tmp_path / "repo", overwrite=True, max_batch_size=8)
    assert "max_batch_size: 8" in (tmp_path / "repo" / "model" / "config.pbtxt").read_text()


def test_damaged_source_names_the_file(saved_tiny, tmp_path):
    _, saved = saved_tiny
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "module.pt2").write_bytes(b"garbage")
    with pytest.raises(DamagedSaveError, match="module.pt2"):
        export_triton(broken, tmp_path / "repo")
    with pytest.raises(ValueError, match="is not a directory written by OptimizedModule.save"):
        export_triton(tmp_path / "missing", tmp_path / "repo")


def test_missing_server_names_the_install(monkeypatch):
    import importlib.util

    from torchopt.serve.triton_server import ServeExtraMissing, find_tritonserver

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ServeExtraMissing, match=r"pip install 'torchopt-infer\[serve\]'.*nvidia-pytriton==0.7.0"):
        find_tritonserver()


@pytest.mark.gpu
def test_a_module_optimized_on_a_gpu_exports(saved_tiny, tmp_path):
    # The output probe runs on the module's device (it once fed CPU tensors to a CUDA module).
    model, _ = saved_tiny
    spec = torchopt.InputSpec("x", min=(1, 3, 8, 8), opt=(4, 3, 8, 8), max=(16, 3, 8, 8))
    fast = torchopt.optimize(model, "eager-fp32", inputs=[spec], device="cuda")
    export = export_triton(fast, tmp_path / "repo", name="tiny")
    proto = parse_model_config((tmp_path / "repo" / "tiny" / "config.pbtxt").read_text(), "tiny")
    assert list(proto.output[0].dims) == [5] and export.max_batch_size == 16


def test_integer_inputs_warm_up_on_a_sample_from_their_value_range(tmp_path):
    class Ids(torch.nn.Module):
        def forward(self, ids):
            return (ids * 2).float()

    spec = torchopt.InputSpec("ids", dtype="int64", min=(1, 6), opt=(4, 6), max=(8, 6), value_range=(3, 9))
    fast = torchopt.optimize(Ids().eval(), "eager-fp32", inputs=[spec], device="cpu")
    export_triton(fast, tmp_path / "repo", name="ids")
    proto = parse_model_config((tmp_path / "repo" / "ids" / "config.pbtxt").read_text(), "ids")
    warm = proto.model_warmup[0].inputs["ids"]
    assert warm.input_data_file == "input_0" and not warm.random_data
    sample = np.frombuffer((tmp_path / "repo" / "ids" / "warmup" / "input_0").read_bytes(), dtype=np.int64)
    assert sample.shape == (6,) and sample.min() >= 3 and sample.max() < 9


def test_one_python_backend_instance_on_each_of_two_gpus(saved_tiny, tmp_path):
    _, saved = saved_tiny
    export_triton(saved, tmp_path / "repo", name="tiny", instance_kind="gpu", gpus=[0, 1], instance_count=1)
    proto = parse_model_config((tmp_path / "repo" / "tiny" / "config.pbtxt").read_text(), "tiny")
    (group,) = proto.instance_group
    assert group.kind == group.KIND_GPU and group.count == 1 and list(group.gpus) == [0, 1]


def test_gpus_for_a_cpu_module_with_auto_instances_is_refused(saved_tiny, tmp_path):
    _, saved = saved_tiny
    with pytest.raises(ValueError, match=r"TritonConfig.gpus=\[0, 1\] places gpu instances, but the module was"):
        export_triton(saved, tmp_path / "repo", gpus=[0, 1])
    assert not (tmp_path / "repo").exists() or list((tmp_path / "repo").iterdir()) == []


def test_damaged_models_names_each_torchopt_model_whose_saved_module_is_damaged(saved_tiny, tmp_path):
    repo = tmp_path / "repo"
    export_triton(saved_tiny[1], repo, name="tiny", preprocess=PreprocessConfig())
    assert damaged_models(repo) == {}  # the preprocess and ensemble models hold no saved module: not checked
    (repo / "tiny" / "1" / "artifact" / "module.pt2").write_bytes(b"garbage")
    assert list(damaged_models(repo)) == ["tiny"]
    assert "module.pt2' is damaged: it is not the zip archive" in damaged_models(repo)["tiny"]
    shutil.rmtree(repo / "tiny" / "1" / "artifact")
    assert "is not a saved torchopt module" in damaged_models(repo)["tiny"]
