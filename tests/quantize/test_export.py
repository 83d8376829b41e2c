"""torch.export of ModelOpt-quantized models under export_torch_mode (CUDA: the graph Torch-TensorRT consumes)."""

import pytest
import torch

import torchopt.quantize as tq


def test_export_refuses_cpu_models(cnn, digits):
    q = tq.quantize(cnn, "int8", digits.calib(1), progress=False)
    with pytest.raises(
        ValueError, match=r"export_quantized needs the model and the example inputs on CUDA \(found \['cpu'\]\)"
    ):
        tq.export_quantized(q, (digits.x_test[:4],))


def test_export_bad_arguments(cnn):
    with pytest.raises(TypeError, match=r"args must be a tuple of example inputs, got Tensor"):
        tq.export_quantized(cnn, torch.zeros(1))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
        tq.export_quantized("model", ())


def test_quant_ops_counts_only_modelopt_ops():
    program = torch.export.export(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    assert tq.quant_ops(program) == {}
    assert tq.quant_ops(program.graph_module) == {} and tq.quant_ops(program.graph) == {}
    with pytest.raises(TypeError, match=r"program must be an ExportedProgram, a GraphModule or a Graph"):
        tq.quant_ops("graph")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_export_on_cuda_contains_quantize_ops(cnn, digits, fmt):
    """The issue's GPU verification: INT8 and FP8 models export with tensorrt::quantize_op nodes."""
    model = cnn.cuda()
    calib = [x.cuda() for x in digits.calib(2)]
    q = tq.quantize(model, fmt, calib, progress=False)
    x = digits.x_test[:8].cuda()
    if fmt == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        with pytest.warns(tq.DeploymentWarning, match="sm_89"):
            program = tq.export_quantized(q, (x,))
    else:
        program = tq.export_quantized(q, (x,))
    ops = tq.quant_ops(program)
    assert ops.get("tensorrt.quantize_op.default", 0) >= 4, ops  # one per activation quantizer at least
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), q(x), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_export_with_dynamic_batch_on_cuda(cnn, digits):
    q = tq.quantize(cnn.cuda(), "int8", [x.cuda() for x in digits.calib(2)], progress=False)
    batch = torch.export.Dim("batch", min=1, max=256)
    program = tq.export_quantized(q, (digits.x_test[:8].cuda(),), dynamic_shapes={"x": {0: batch}})
    out = program.module()(digits.x_test[:33].cuda())
    assert out.shape == (33, 10)
