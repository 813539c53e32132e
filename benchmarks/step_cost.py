"""EKDAA's training step against backprop's on the CPU, for whichever ekdaa is importable (so two
commits compare: a git worktree of the older one on PYTHONPATH), one JSON line:

    git worktree add /tmp/old COMMIT && PYTHONPATH=/tmp/old python benchmarks/step_cost.py [MODEL]
    PYTHONPATH=. python benchmarks/step_cost.py [MODEL]

MODEL (paper-cnn, or resnet20), SGD step, 2 threads: ms/step (median of alternating blocks) and ratio at batch 50, 256 and
1 (3x8x8, host-bound); peak memory ratio (torch profiler); aten ops of forward + backward (dispatch
mode, fused error map off) and convolution_backward dtypes, in float32 and under bf16 autocast."""
import sys, time, statistics, collections, json, warnings, torch, torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.profiler import profile, ProfilerActivity
import ekdaa, ekdaa.fused as fused
from ekdaa.models import build_model
torch.set_num_threads(2)
warnings.simplefilter("ignore")  # an older commit's advice on BatchNorm networks
MODEL = sys.argv[1] if len(sys.argv) > 1 else "paper-cnn"

class Ops(TorchDispatchMode):
    def __init__(self): super().__init__(); self.n = 0; self.dt = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        if func.overloadpacket is torch.ops.aten.convolution_backward: self.dt[str(args[0].dtype).replace("torch.", "")] += 1
        return func(*args, **(kwargs or {}))

def setup(rule, b, s):
    torch.manual_seed(0)
    x = torch.randn(b, 3, s, s).contiguous(memory_format=torch.channels_last); y = torch.randint(10, (b,))
    m = ekdaa.convert(build_model(MODEL, (3, s, s), 10), rule).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(ekdaa.param_groups(m, lr=0.01), lr=0.01, momentum=0.9)
    def step(amp=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(m(x), y)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return m, x, y, step

def peak(step):
    from torch.profiler._memory_profiler import Action
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        step()
    now = top = 0
    for _, a, _, size in p._memory_profile().timeline:
        now += size if a == Action.CREATE else -size if a == Action.DESTROY else 0; top = max(top, now)
    return top

out = {"model": MODEL}
for b, s, steps, reps in ((50, 32, 3, 7), (256, 32, 1, 5), (1, 8, 30, 9)):
    st = {r: setup(r, b, s) for r in ("bp", "ekdaa")}
    for r, (_, _, _, step) in st.items():
        for _ in range(3): step()
    times = {r: [] for r in st}
    for _ in range(reps):
        for r, (_, _, _, step) in st.items():
            t = time.perf_counter()
            for _ in range(steps): step()
            times[r].append((time.perf_counter() - t) / steps * 1e3)
    ms = {r: statistics.median(v) for r, v in times.items()}
    mem = {r: peak(st[r][3]) for r in st}
    out[f"b{b}"] = dict(bp_ms=round(ms["bp"], 2), ekdaa_ms=round(ms["ekdaa"], 2), time_ratio=round(ms["ekdaa"] / ms["bp"], 3),
                        mem_ratio=round(mem["ekdaa"] / mem["bp"], 3))
fused.ENABLED = False  # an older commit's switch; these 2x8x8 tensors are unfused anyway
for amp in (False, True):
    res = {}
    for r in ("bp", "ekdaa"):
        m, x, y, _ = setup(r, 2, 8)
        with Ops() as o:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
        res[r] = (o.n, dict(o.dt))
    out["bf16" if amp else "fp32"] = dict(ops=f"{res['ekdaa'][0]}/{res['bp'][0]}", ops_ratio=round(res["ekdaa"][0] / res["bp"][0], 3),
                                          conv_backward_dtypes={r: v[1] for r, v in res.items()})
print(json.dumps(out))
