"""The Python-backend model.py's placement of each model instance on the GPU Triton gave it."""

import pytest
import torch

from torchopt.serve.triton_model import instance_device


def _gpu_args(index):
    return {"model_instance_kind": "GPU", "model_instance_device_id": index}


def test_cpu_instances_run_on_the_cpu():
    assert instance_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) == torch.device("cpu")
    assert instance_device({}) == torch.device("cpu")


def test_each_gpu_instance_gets_the_gpu_triton_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert instance_device(_gpu_args("0")) == torch.device("cuda", 0)
    assert instance_device(_gpu_args("1")) == torch.device("cuda", 1)


def test_a_gpu_the_stub_cannot_see_names_the_index_and_the_visible_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"model_instance_device_id 1 .*1 CUDA device\(s\) visible"):
        instance_device(_gpu_args("1"))


def test_a_gpu_instance_without_cuda_is_an_error_naming_the_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"model_instance_device_id 0 .*0 CUDA device\(s\) visible"):
        instance_device(_gpu_args("0"))


@pytest.mark.parametrize("given", [None, "", "cuda:1", "-1"])
def test_a_missing_or_malformed_index_is_an_error(given):
    args = {"model_instance_kind": "GPU"} | ({} if given is None else {"model_instance_device_id": given})
    with pytest.raises(ValueError, match=r"model_instance_device_id must be a GPU index .*got"):
        instance_device(args)


@pytest.mark.multi_gpu
def test_the_second_gpu_instance_is_placed_on_device_1():
    assert instance_device(_gpu_args("1")) == torch.device("cuda", 1)
