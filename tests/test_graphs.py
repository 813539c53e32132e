"""GraphedStep's bookkeeping on the CPU, with CUDA's streams and graphs stood in for by fakes
whose 'replay' runs the recorded step again on the static inputs (tests/test_cuda.py checks real
graphs on a GPU): when it warms up, records, replays, falls back to eager and records again."""
from __future__ import annotations

import contextlib

import pytest
import torch

from ekdaa.graphs import GraphedStep, set_capturable


class FakeGraph:
    recording = False

    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1
        for out, fresh in zip(self.outputs, self.step(*self.inputs)):
            out.copy_(fresh)


class Recorded(list):
    waits = 0


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream and graph API on the CPU; returns the list of graphs recorded (and, as
    its attribute ``waits``, how often one stream waited for another)."""
    graphs = Recorded()

    class Stream:
        def wait_stream(self, other):
            graphs.waits += 1

    @contextlib.contextmanager
    def graph(g):
        FakeGraph.recording = True
        graphs.append(g)
        try:
            yield
        finally:
            FakeGraph.recording = False

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return graphs


def test_graphed_step_warms_up_records_replays_and_falls_back(fake_cuda):
    calls = []  # (how, batch size) per run of the step: eager, recording, or replayed

    def step(x):
        calls.append(("recording" if FakeGraph.recording else "run", len(x)))
        return (x * 2,)

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    graphed = GraphedStep(step, opt, warmup=2)
    full, part = torch.arange(4.0), torch.arange(3.0)

    def call(x):
        (out,) = graphed(x)
        assert torch.equal(out, x * 2)  # each call's own batch, replayed or not

    call(part)                          # a partial first batch: warm-up starts with its shape ...
    call(full), call(full)              # ... and starts again with the full one
    assert not fake_cuda and calls == [("run", 3), ("run", 4), ("run", 4)]
    assert fake_cuda.waits == 6  # each warm-up step: the side stream waits for the current one, and back
    call(full + 1)                      # recorded and replayed
    assert len(fake_cuda) == 1 and fake_cuda[0].replays == 1 and calls[-2:] == [("recording", 4), ("run", 4)]
    call(full + 2), call(part)          # replayed; the partial batch eager
    assert fake_cuda[0].replays == 2 and calls[-1] == ("run", 3)
    opt.param_groups[0]["lr"] = 0.05    # a scheduler's step: one more eager step, then a new recording
    call(full + 3)
    assert len(fake_cuda) == 1 and calls[-1] == ("run", 4) and graphed.graph is None
    call(full + 4)
    assert len(fake_cuda) == 2 and fake_cuda[1].replays == 1 and graphed.graph is fake_cuda[1]


@pytest.fixture(autouse=True)
def fake_graph_replays_its_step(monkeypatch):
    """FakeGraph.replay needs the step and buffers GraphedStep recorded: take them from it."""
    record = GraphedStep._record

    def _record(self, batch):
        record(self, batch)
        self.graph.step, self.graph.inputs, self.graph.outputs = self.step, self.inputs, self.outputs

    monkeypatch.setattr(GraphedStep, "_record", _record)


def test_set_capturable_moves_adams_step_count():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(2)
    opt.step()
    set_capturable(opt, True)
    assert opt.param_groups[0]["capturable"] and opt.state[p]["step"].dtype == torch.float32
    set_capturable(opt, False)
    assert not opt.param_groups[0]["capturable"] and opt.state[p]["step"].device.type == "cpu"
    sgd = torch.optim.SGD([p], lr=0.1)
    set_capturable(sgd, True)
    assert "capturable" not in sgd.param_groups[0]
