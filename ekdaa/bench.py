"""Training-step benchmark of the learning rules on the authors' CIFAR-10 network.

``python -m ekdaa.bench`` times one full training step (forward, cross-entropy,
backward, SGD-momentum step, ``zero_grad(set_to_none=True)``) of each rule on
``paper-cnn`` (tanh, 3x32x32 inputs, 10 classes), with random data fixed in memory
and, by default, channels_last model and inputs. Rules alternate in one process:
each repeat times a block of ``--steps`` steps of every rule in turn (after
warm-up), and a rule's ms/step is the median over its blocks, so machine noise
falls on all rules alike. Ratios are to ``bp``, which is always run.

Besides the batch sizes asked for, a host-bound row (``--host``, on by default): batch 1 of
3x8x8 images, the smallest the network takes, where a step's time is the host's work per
operation (on a GPU, launches), not arithmetic.

What "memory" means (both: the peak of one step's allocations above what was allocated
before it, so activations, gradients and backward temporaries, not parameters or optimizer state):

* CPU: the peak of the allocations torch's profiler records during one step;
* CUDA: ``torch.cuda.max_memory_allocated`` during one step minus the memory allocated before it.

``RULE+graph`` rows report the memory of the eager step their graph records (a replay
allocates nothing; the graph's pool holds that step's tensors for good). ``ops`` is the number
of aten operations one step's forward and backward dispatch below autograd, EKDAA's error map
counted eager (a fused call is one compiled kernel instead); the optimizer's are not counted, and
graph and compile rows have none.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .config import names_from
from .graphs import GraphedStep, set_capturable
from .models import build_model
from .rules import RULES, convert, param_groups
from .rules import compile as compile_model
from .train import keep_freed_memory

INPUT_SHAPE = (3, 32, 32)
HOST_SHAPE = (3, 8, 8)  # the smallest input paper-cnn's three pools take: the host-bound row, at batch 1
NUM_CLASSES = 10
LR = 0.01
WARMUP_STEPS = 3
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16}
MEMORY = {
    "cpu": "peak of the allocations torch's profiler records in one step, above what was allocated before it",
    "cuda": "peak torch.cuda.max_memory_allocated during one step minus memory allocated before it",
}


class _Setup:
    """One rule's converted model, optimizer and fixed batch, with its training step."""

    def __init__(self, rule: str, batch: int, device: torch.device, amp: str, channels_last: bool,
                 compile: bool = False, fused: bool = True, graph: bool = False,
                 shape: tuple[int, ...] = INPUT_SHAPE) -> None:
        torch.manual_seed(0)  # same data and same W for every rule
        x = torch.randn(batch, *shape)
        y = torch.randint(NUM_CLASSES, (batch,))
        model = build_model("paper-cnn", shape, NUM_CLASSES, activation="tanh")
        name, options = parse_row(rule)
        if not fused:
            options["fuse"] = False  # the error map eager (ekdaa's option)
        model = convert(model, name, example_input=x, **options)  # on CPU: DFA draws its feedback there
        fmt = torch.channels_last if channels_last else torch.preserve_format
        self.model = model.to(device=device, memory_format=fmt).train()
        self.forward = compile_model(self.model) if compile else self.model
        self.x, self.y = x.to(device=device, memory_format=fmt), y.to(device)
        self.opt = torch.optim.SGD(param_groups(self.model, lr=LR), lr=LR, momentum=0.9)
        self.device, self.dtype = device, AMP_DTYPES[amp]
        self.graphed = None  # the last warm-up step records the graph
        if graph:
            set_capturable(self.opt, True)
            self.graphed = GraphedStep(self._train, self.opt, warmup=WARMUP_STEPS - 1)

    def _train(self, x: Tensor, y: Tensor) -> tuple[Tensor]:
        """One eager training step; gradients are released at the end (zeroed in place under a graph)."""
        graphed = self.graphed is not None
        autocast = (torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=not graphed) if self.dtype
                    else nullcontext())
        with autocast:
            loss = F.cross_entropy(self.forward(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=not graphed)
        return (loss.detach(),)

    def step(self) -> None:
        """One training step, replayed from its CUDA graph where there is one."""
        (self.graphed or self._train)(self.x, self.y)

    def time_block(self, steps: int) -> float:
        """Mean milliseconds per step over ``steps`` consecutive steps."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        return (time.perf_counter() - start) * 1e3 / steps

    def memory(self) -> int | None:
        """Bytes one step needs, as defined in the module docstring (None: not measurable here)."""
        if self.device.type == "cuda":
            _sync(self.device)
            # under a graph .grad stays allocated between steps; eager steps free it: count it alike
            held = sum(p.grad.nbytes for p in self.model.parameters() if p.grad is not None) if self.graphed else 0
            base = torch.cuda.memory_allocated(self.device) - held
            torch.cuda.reset_peak_memory_stats(self.device)
            self._train(self.x, self.y)  # a graph's replay allocates nothing: measure the step it records
            _sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        return _cpu_peak(lambda: self._train(self.x, self.y))

    def ops(self) -> int | None:
        """aten operations one step's forward and backward dispatch, with EKDAA's error map eager (None
        for graph and compile rows: a dispatch mode would also spoil torch.compile's cached code)."""
        if self.graphed is not None or self.forward is not self.model:
            return None
        rule = self.model.ekdaa_rule
        fuse = getattr(rule, "fuse", None)
        if fuse is not None:
            rule.fuse = False
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext())
        with _OpCounter() as counter:
            with autocast:
                loss = F.cross_entropy(self.forward(self.x), self.y)
            loss.backward()
        self.opt.zero_grad(set_to_none=True)
        if fuse is not None:
            rule.fuse = fuse
        return counter.count


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched (below autograd) while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _cpu_peak(step) -> int | None:
    """Peak bytes allocated during ``step()`` above what was allocated before it, from the allocation
    timeline of torch's profiler (its memory profile, a private API: None where it is missing)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    try:
        from torch.profiler._memory_profiler import Action
        timeline = prof._memory_profile().timeline
    except (ImportError, AttributeError):
        return None
    now = peak = 0
    for _, action, _, size in timeline:
        now += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, now)
    return peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(rules: Sequence[str], batch_sizes: Sequence[int], steps: int, repeats: int,
        device: str | torch.device = "cpu", amp: str = "none",
        channels_last: bool = True, compile: bool = False, unfused: bool = False,
        cuda_graph: bool = False, host: bool = True) -> list[dict[str, Any]]:
    """Benchmark ``rules`` (plus ``bp``, listed first) at each batch size, and with ``host`` at
    batch 1 of ``HOST_SHAPE`` inputs; with ``compile``, each rule also runs compiled
    (:func:`ekdaa.compile`), as row ``RULE+compile``; with ``unfused``, each rule also runs with
    EKDAA's error map unfused (eager), as ``RULE+unfused``; with ``cuda_graph`` (CUDA only), each
    rule's whole step also replays from a CUDA graph, as ``RULE+graph``.

    Returns one row per (input, batch, row): ``rule``, ``batch``, ``input`` (CxHxW), ``ms`` (median
    ms/step), ``images_per_s``, ``ratio_to_bp`` (ms, to eager bp), ``mem_ratio_to_bp``, ``ops`` and
    ``ops_ratio_to_bp`` (None for graph rows).
    """
    unknown = [r for r in rules if parse_row(r)[0] not in RULES]
    if unknown:
        raise ValueError(f"unknown rules {unknown}: choose from {', '.join(RULES)}")
    if min(batch_sizes, default=0) < 1 or steps < 1 or repeats < 1:
        raise ValueError("batch sizes, steps and repeats must be positive")
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown amp {amp!r}: choose one of {', '.join(AMP_DTYPES)}")
    device = torch.device(device)
    if cuda_graph and device.type != "cuda":
        raise ValueError("--cuda-graph records CUDA graphs: use it with --device cuda")
    names = list(dict.fromkeys(["bp", *rules]))
    variants = {name: dict(rule=name) for name in names}
    if unfused:
        variants.update({f"{name}+unfused": dict(rule=name, fused=False) for name in names
                         if any(o.name == "fuse" for o in RULES[parse_row(name)[0]].OPTIONS)})
    if compile:
        variants.update({f"{name}+compile": dict(rule=name, compile=True) for name in names})
    if cuda_graph:
        variants.update({f"{name}+graph": dict(rule=name, graph=True) for name in names})
    inputs = [(batch, INPUT_SHAPE) for batch in batch_sizes] + ([(1, HOST_SHAPE)] if host else [])
    return [row for batch, shape in inputs for row in _run(variants, batch, shape, steps, repeats, device, amp,
                                                           channels_last)]


def _run(variants: dict[str, dict[str, Any]], batch: int, shape: tuple[int, ...], steps: int, repeats: int,
         device: torch.device, amp: str, channels_last: bool) -> list[dict[str, Any]]:
    setups = {label: _Setup(batch=batch, device=device, amp=amp, channels_last=channels_last, shape=shape, **how)
              for label, how in variants.items()}
    for setup in setups.values():
        for _ in range(WARMUP_STEPS):
            setup.step()
    memory = {name: setup.memory() for name, setup in setups.items()}
    ops = {name: setup.ops() for name, setup in setups.items()}
    blocks: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name, setup in setups.items():
            blocks[name].append(setup.time_block(steps))
    ms = {name: statistics.median(times) for name, times in blocks.items()}
    ratio = lambda a, b: round(a / b, 3) if a is not None and b else None  # noqa: E731
    return [dict(rule=name, batch=batch, input="x".join(map(str, shape)), ms=round(ms[name], 3),
                 images_per_s=round(batch * 1e3 / ms[name], 1), ratio_to_bp=ratio(ms[name], ms["bp"]),
                 mem_ratio_to_bp=ratio(memory[name], memory["bp"]), ops=ops[name],
                 ops_ratio_to_bp=ratio(ops[name], ops["bp"])) for name in setups]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def parse_row(row: str) -> tuple[str, dict[str, Any]]:
    """A benchmark row, ``RULE`` or ``RULE:option=value:...`` (e.g. ``ekdaa:beta=0.5``),
    as the rule's name and options (numbers where they parse as numbers)."""
    name, *pairs = row.split(":")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value
    return name, options


def _rule_list(text: str) -> list[str]:
    return names_from(text, list(RULES), "rule", lambda row: parse_row(row)[0])


def _batch_list(text: str) -> list[int]:
    try:
        return [positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        message = f"invalid batch sizes {text!r}: give positive integers separated by commas, e.g. 50,256"
        raise argparse.ArgumentTypeError(message) from None


def add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's flags, on ``parser`` (``python -m ekdaa.bench`` and ``ekdaa bench`` alike)."""
    parser.add_argument("--rules", type=_rule_list, default=list(RULES),
                        help=f"comma list from {', '.join(RULES)}, each optionally with rule options as "
                        "RULE:option=value (e.g. ekdaa:beta=0.5); bp is always included")
    parser.add_argument("--batch-sizes", type=_batch_list, default=[50, 256], help="comma list")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps per block")
    parser.add_argument("--repeats", type=positive_int, default=5, help="blocks per rule")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="none",
                        help="bf16: forward and loss under torch.autocast")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="keep model and inputs contiguous (NCHW)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each rule torch.compile'd (rows RULE+compile)")
    parser.add_argument("--unfused", action="store_true",
                        help="also time each rule with EKDAA's error map unfused, eager (rows RULE+unfused)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time each rule's whole step replayed from a CUDA graph (rows RULE+graph; "
                        "--device cuda)")
    parser.add_argument("--no-host", dest="host", action="store_false",
                        help="leave out the host-bound row (batch 1 of 3x8x8 images)")
    parser.add_argument("--threads", type=positive_int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--table", metavar="JSON", help="print the Markdown table of a saved --json result "
                        "(for the README) and run nothing")
    return parser


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _format_table(rows: list[dict[str, Any]]) -> str:
    width = max(14, *(len(r["rule"]) for r in rows))
    header = (f"{'rule':<{width}} {'batch':>5} {'input':>7} {'ms/step':>9} {'images/s':>9} {'ratio to bp':>11} "
              f"{'mem ratio':>9} {'ops':>5} {'ops ratio':>9}")
    lines = [header, "-" * len(header)]
    lines += [f"{r['rule']:<{width}} {r['batch']:>5} {r['input']:>7} {r['ms']:>9.2f} {r['images_per_s']:>9.1f} "
              f"{_cell(r['ratio_to_bp']):>11} {_cell(r['mem_ratio_to_bp']):>9} {r['ops'] or '-':>5} "
              f"{_cell(r['ops_ratio_to_bp']):>9}" for r in rows]
    return "\n".join(lines)


def markdown(info: dict[str, Any]) -> str:
    """A benchmark's JSON (``--json``) as a Markdown table headed by its machine and settings."""
    head = (f"Device {info['device']}, torch {info['torch']}, {info['threads']} threads, amp {info['amp']}, "
            f"channels_last {info['channels_last']}.")
    lines = [head, "", "| row | batch | input | ms/step | images/s | ratio to bp | memory ratio | ops ratio |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rule']} | {r['batch']} | {r.get('input', 'x'.join(map(str, INPUT_SHAPE)))} | {r['ms']:.2f} | "
              f"{r['images_per_s']:.0f} | {_cell(r['ratio_to_bp'])} | {_cell(r['mem_ratio_to_bp'])} | "
              f"{_cell(r.get('ops_ratio_to_bp'))} |" for r in info["rows"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (``python -m ekdaa.bench --help``)."""
    parser = add_options(argparse.ArgumentParser(
        prog="python -m ekdaa.bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    try:
        execute(parser.parse_args(argv))
    except ValueError as err:
        parser.error(str(err))


def execute(args: argparse.Namespace) -> None:
    """Run the benchmark the parsed flags of :func:`add_options` describe and print its table or JSON."""
    if args.table:
        try:
            print(markdown(json.loads(open(args.table).read())))
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"--table {args.table}: not a benchmark JSON written by --json ({err})") from None
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as a training run does: no page faults from malloc's trimming in the timings
    rows = run(args.rules, args.batch_sizes, args.steps, args.repeats, device, args.amp,
               args.channels_last, args.compile, args.unfused, args.cuda_graph, args.host)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile, "unfused": args.unfused,
            "cuda_graph": args.cuda_graph, "host_input": "x".join(map(str, HOST_SHAPE)) if args.host else None,
            "memory": MEMORY[device.type], "rows": rows}
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"device {name}, torch {info['torch']}, threads {info['threads']}, amp {args.amp}, "
          f"channels_last {args.channels_last}, compile {args.compile}, {args.steps} steps x {args.repeats} "
          "repeats (median)")
    print(f"memory = {MEMORY[device.type]}")
    print(_format_table(rows))


if __name__ == "__main__":
    main()
