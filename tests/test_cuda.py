"""GPU checks (skipped without CUDA): the rules on the GPU agree with the CPU, bf16 autocast trains
with every backward convolution in bf16, a run goes end to end on the device, and a step replayed
from a CUDA graph trains what the eager step trains. benchmarks/gpu_check.sh runs these.

Comparisons with the CPU turn TF32 off (cuDNN and cuBLAS use it for float32 by default: ~1e-1
relative); graph-against-eager comparisons run deterministic kernels, so that what differs is the
step, not the order of a reduction."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: before its first use

import ekdaa  # noqa: E402
from ekdaa.checkpoint import load_checkpoint  # noqa: E402
from ekdaa.models import build_model  # noqa: E402
from ekdaa.train import TrainConfig, train  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture
def deterministic(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.use_deterministic_algorithms(True, warn_only=True)  # max-pool backward has no other kernel
    yield
    torch.use_deterministic_algorithms(False)


@cuda
@pytest.mark.parametrize("rule", list(ekdaa.RULES))
def test_gpu_grads_match_cpu(rule, no_tf32):
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
@pytest.mark.parametrize("rule", ["bp", "ekdaa", "kolen-pollack"])
def test_bf16_autocast_step_is_finite_close_and_in_bf16(rule):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    model = ekdaa.convert(build_model("paper-cnn", (3, 32, 32), 10), rule).cuda()
    ref = copy.deepcopy(model)
    dtypes = []
    conv_backward = torch.ops.aten.convolution_backward.default

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is conv_backward:
                dtypes.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    with Spy():
        loss.backward()
    F.cross_entropy(ref(x), y).backward()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0) > 0.95


@cuda
def test_error_map_is_fused_on_the_gpu_at_any_size(monkeypatch):
    monkeypatch.setattr(ekdaa.rules.ekdaa, "_KERNELS", {})  # a kernel no earlier test has compiled
    model = ekdaa.convert(build_model("small-cnn", (1, 8, 8), 10), "ekdaa").cuda()
    F.cross_entropy(model(torch.randn(2, 1, 8, 8, device="cuda")), torch.tensor([0, 1], device="cuda")).backward()
    kernel = model[1].kernel
    assert kernel._compiled is not None and not kernel._broken


@cuda
def test_training_run_on_gpu(tmp_path):
    summary = train(TrainConfig(dataset="digits", model="paper-cnn", epochs=10, device="cuda", amp="bf16",
                                channels_last=True, out=str(tmp_path / "gpu")), log=print).summary
    assert summary["device"].startswith("cuda") and summary["test_accuracy"] > 0.9


@cuda
@pytest.mark.parametrize("rule", list(ekdaa.RULES))
def test_cuda_graph_training_equals_eager(rule, tmp_path, deterministic):
    """The graph replays the eager step: same weights after two epochs with partial last batches
    (eager) and a cosine schedule (a new recording each epoch), EKDAA's error map fused."""
    base = dict(dataset="digits", model="paper-cnn", rule=rule, epochs=2, optimizer="sgd", lr=0.01,
                lr_schedule="cosine", device="cuda", activation="sign" if rule == "bp-ste" else "tanh")
    states = []
    for graph in (False, True):
        out = tmp_path / f"graph-{graph}"
        train(TrainConfig(**base, cuda_graph=graph, out=str(out)), log=print)
        states.append(load_checkpoint(out / "checkpoint.pt")["model"])
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=1e-4, atol=1e-5, msg=name)


@cuda
def test_cuda_graph_resumes_an_eager_adam_run(tmp_path, deterministic):
    """Adam runs capturable on a GPU, graphed or not: a run resumed with a graph continues the eager one."""
    base = dict(dataset="digits", model="paper-cnn", device="cuda")
    train(TrainConfig(**base, epochs=2, out=str(tmp_path / "eager")), log=print)
    train(TrainConfig(**base, epochs=1, out=str(tmp_path / "mixed")), log=print)
    train(TrainConfig(**base, epochs=2, cuda_graph=True, out=str(tmp_path / "mixed")), resume=True, log=print)
    eager, mixed = (load_checkpoint(tmp_path / run / "checkpoint.pt")["model"] for run in ("eager", "mixed"))
    for name, value in eager.items():
        torch.testing.assert_close(mixed[name], value, rtol=1e-4, atol=1e-5, msg=name)


@cuda
def test_cuda_graph_sgd_bf16_channels_last_trains(tmp_path):
    summary = train(TrainConfig(dataset="digits", model="paper-cnn", epochs=10, optimizer="sgd", lr=0.01,
                                device="cuda", amp="bf16", channels_last=True, cuda_graph=True,
                                out=str(tmp_path / "graph")), log=print).summary
    assert summary["test_accuracy"] > 0.9
