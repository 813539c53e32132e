"""GPU checks (skipped without CUDA): the rules on the GPU agree with the CPU, bf16
autocast trains, and a run goes end to end on the device. benchmarks/gpu_check.sh runs these."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ekdaa
from ekdaa.models import build_model
from ekdaa.train import TrainConfig, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("rule", list(ekdaa.RULES))
def test_gpu_grads_match_cpu(rule):
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    cpu = ekdaa.convert(build_model("paper-cnn", (3, 32, 32), 10, bias=True), rule, example_input=x)
    gpu = copy.deepcopy(cpu).cuda().to(memory_format=torch.channels_last)
    for model, (xx, yy) in ((cpu, (x, y)), (gpu, (x.cuda().contiguous(memory_format=torch.channels_last), y.cuda()))):
        F.cross_entropy(model(xx), yy).backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)


@cuda
@pytest.mark.parametrize("rule", ["bp", "ekdaa"])
def test_bf16_autocast_step_is_finite_and_close(rule):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    model = ekdaa.convert(build_model("paper-cnn", (3, 32, 32), 10), rule).cuda()
    ref = copy.deepcopy(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        F.cross_entropy(model(x).float(), y).backward()
    F.cross_entropy(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0) > 0.95


@cuda
def test_training_run_on_gpu(tmp_path):
    summary = train(TrainConfig(dataset="digits", model="paper-cnn", epochs=10, device="cuda", amp="bf16",
                                channels_last=True, out=str(tmp_path / "gpu")), log=print)
    assert summary["device"].startswith("cuda") and summary["test_accuracy"] > 0.9
