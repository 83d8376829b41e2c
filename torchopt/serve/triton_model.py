"""The Python-backend `model.py` that `export_triton` copies into a Triton model repository.

Triton's Python backend imports this file in its stub process and calls `TritonPythonModel`. What it serves
comes from the model's config.pbtxt `parameters`:

- ``torchopt_role: "model"``: ``artifact`` names a saved torchopt module in the version folder; it is loaded with
  `torchopt.load` and called on the batch (several requests that Triton's dynamic batcher merged are concatenated
  along dim 0, run as one call and split back).
- ``torchopt_role: "preprocess"``: ``preprocess`` holds a `PreprocessConfig` as JSON and ``size`` the output
  (height, width); uint8 frames become the model's input with `torchopt.kernels.preprocess`.

Tensors cross the stub by DLPack in both directions: the stub's numpy path was compiled against NumPy 1 and
computes wrong output sizes under NumPy 2 ("output tensor shape does not match size of output"), DLPack does not
involve NumPy at all. The server started by `torchopt serve` lists the running interpreter's site directories in
``TORCHOPT_TRITON_SITE_DIRS``; they are added (with their .pth files: editable installs, import hooks) before
torch is imported, because the stub embeds the base interpreter, not the virtual environment.
"""

import os
import site

for _dir in os.environ.get("TORCHOPT_TRITON_SITE_DIRS", "").split(os.pathsep):
    if _dir:
        site.addsitedir(_dir)

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.utils.dlpack  # noqa: E402

import torchopt  # noqa: E402
from torchopt.kernels import PreprocessConfig, preprocess  # noqa: E402

__all__ = ["TritonPythonModel", "instance_device"]


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def instance_device(args: dict[str, str]) -> torch.device:
    """The device of this model instance: for ``KIND_GPU``, the GPU Triton gave it.

    Triton starts one stub process per instance; ``instance_group { kind: KIND_GPU count: 1 gpus: [0, 1] }``
    makes two, whose ``model_instance_device_id`` is "0" and "1". Every stub sees all the server's GPUs, so the
    index must be honoured (else both instances would load onto cuda:0).
    """
    kind = args.get("model_instance_kind", "CPU")
    if kind != "GPU":
        return torch.device("cpu")
    given = args.get("model_instance_device_id")
    if given is None or not str(given).isdigit():
        raise ValueError(f"model_instance_device_id must be a GPU index for a KIND_GPU instance, got {given!r}")
    index = int(given)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= visible:
        raise ValueError(
            f"model_instance_device_id {index} (instance_group gpus) names a GPU this stub cannot see:"
            f" {visible} CUDA device(s) visible; check CUDA_VISIBLE_DEVICES and the config's gpus"
        )
    return torch.device("cuda", index)


def _flat_outputs(out: Any, names: list[str]) -> list[torch.Tensor]:
    """The model's output as one tensor per Triton output name, in the config's order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[n] for n in names]
    return list(out)


class TritonPythonModel:
    """Triton's Python-backend entry point: `initialize` loads, `execute` runs a list of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # only exists inside the Python backend's stub

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        params = _parameters(config)
        torch.set_num_threads(int(params.get("threads", "1")))
        self.device = instance_device(args)
        if self.device.type == "cuda":
            # The current device is cuda:0 in every stub: what allocates or launches on the current device
            # (Triton kernels, CUDA graphs, cuBLAS workspaces) must go to this instance's GPU.
            torch.cuda.set_device(self.device)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.role = params.get("torchopt_role", "model")
        version_dir = Path(args["model_repository"]) / args["model_version"]
        if self.role == "preprocess":
            self.preprocess = PreprocessConfig.from_dict(json.loads(params["preprocess"]))
            self.size = tuple(json.loads(params["size"]))
        else:
            self.module = torchopt.load(version_dir / params["artifact"], device=self.device)

    def _run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            if self.role == "preprocess":
                return [preprocess(inputs[0].to(self.device), self.size, config=self.preprocess)]
            return _flat_outputs(self.module.call_flat(*(x.to(self.device) for x in inputs)), self.outputs)

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self._pb
        tensors = [
            [torch.from_dlpack(pb.get_input_tensor_by_name(r, n).to_dlpack()) for n in self.inputs] for r in requests
        ]
        # Requests whose non-batch dims agree run as one call; others (variable dims) run in their own groups.
        groups: dict[tuple, list[int]] = {}
        for i, ts in enumerate(tensors):
            groups.setdefault(tuple(tuple(t.shape[1:]) for t in ts), []).append(i)
        responses: list[Any] = [None] * len(requests)
        for members in groups.values():
            rows = [tensors[i][0].shape[0] for i in members]
            try:
                batch = [torch.cat([tensors[i][k] for i in members]) for k in range(len(self.inputs))]
                outs = self._run(batch)
            except Exception as exc:  # one failing group must not take the other requests down
                error = pb.TritonError(f"{type(exc).__name__}: {exc}")
                for i in members:
                    responses[i] = pb.InferenceResponse(output_tensors=[], error=error)
                continue
            start = 0
            for i, n in zip(members, rows, strict=True):
                parts = [
                    pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(o[start : start + n].contiguous().cpu()))
                    for name, o in zip(self.outputs, outs, strict=True)
                ]
                responses[i] = pb.InferenceResponse(output_tensors=parts)
                start += n
        return responses
