"""Precision, memory format and torch.compile, chosen per model and device by measuring a few training steps.

On the 2-core CPU of this project, channels_last makes MobileNet-class students train about 3x faster while
bf16 autocast helps ResNets and slows depthwise nets; on CUDA, AMP and channels_last usually win. Habit gets
this wrong, so each (model, device, input, batch) is timed. A study does it at plan time, before any job runs
(edgekd/distill/stage.py `choose_execution`), and records the choice in its plan; jobs only read it.

The choice changes the numbers (bf16 vs fp32 rounding), so it must not be a coin toss: the default (fp32,
contiguous) is left only for a candidate clearly faster (MARGIN, best of ROUNDS interleaved timings), and a
choice is kept per machine (MachineCache: CPU model and flags, cores, GPU, torch version) so that every later
study on that machine trains with the same numerics.

torch.compile (Execution.compile) is chosen the same way, later in the plan (stage.py `choose_compile`, once the
threads are known), with its compile time counted against the steps a training has to repay it: a first compile
costs tens of seconds on a CPU and each later training a second or two from the on-disk caches, where a quickstart
training takes 5-30 s (benchmarks/compile_speed.py times a study's configurations). A CUDA student too small to
fill the GPU is launch-bound: "reduce-overhead" (CUDA graphs) is a candidate there. (BatchNorm's running statistics
are inputs the graph mutates, for which inductor may skip CUDA graphs, pytorch/pytorch#139207: that mode then times
like "default", and the choice follows the timing.)
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from edgekd.config import TrainConfig
from edgekd.errors import EdgeKDError
from edgekd.runio import UnreadableFile, read_json, write_json

# Leave the default only for a candidate at least this much faster. Two fresh quickstart studies minutes apart on
# one machine timed the teacher at bf16 402 vs 737 img/s and chose differently; 6 of 16 runs then differed in test
# accuracy. A choice within the timing noise is not worth different numbers.
MARGIN = 0.10
ROUNDS = 3  # interleaved rounds, best of each candidate: other work on the machine slows a round, not a candidate
# The machine's choices: $EDGEKD_EXECUTION_CACHE, "none" for no cache (each study measures; the tests' setting)
CACHE_ENV = "EDGEKD_EXECUTION_CACHE"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Execution:
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    device: str
    # CPU threads of the training (edgekd/distill/sharing.py): they change float rounding on a CPU, so a training
    # sets them itself, whichever executor runs it; 0: the process's (a GPU training, a record before threads)
    threads: int = 0
    # The torch.compile mode its model trains under ("" = eager): compiled kernels round differently from eager
    # ones, so it is part of the numerics and the key, like precision
    compile: str = ""

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=DTYPES[self.precision])

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(device=self.device, memory_format=self.memory_format())

    def cpu_threads(self):
        """torch's threads set to the training's for the block (then back: a local executor runs the next job)."""
        return cpu_threads(self.threads)

    def compiled(self, model: nn.Module):
        """What a training step calls: `model`, or torch.compile of it in this execution's mode. Static shapes: every
        batch of a training has one shape (the trainer drops a partial last one), and a shape-generic graph would
        round differently from the static one the measurement timed. The weights stay `model`'s."""
        if not self.compile:
            return model
        if self.device == "cpu" and self.threads:
            # inductor writes the thread count into its CPU kernels and its cache key: the training's own threads,
            # not those of whichever process compiled this architecture first (compile_modes: "default" on CPUs)
            return torch.compile(model, dynamic=False, options={"cpp.threads": self.threads})
        return torch.compile(model, mode=None if self.compile == "default" else self.compile, dynamic=False)


@contextmanager
def cpu_threads(threads: int):
    """torch's CPU threads set to `threads` (0: left as they are) for the block, then back."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgeKDError(f"device {name!r} asked for, but torch sees no CUDA GPU here: set study.device = \"cpu\"")
    if not (name == "cpu" or name.startswith("cuda")):
        raise EdgeKDError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    return name


def _candidates(cfg: TrainConfig, device: str) -> list[tuple[str, bool]]:
    if cfg.precision != "auto":
        precisions = [cfg.precision]
    elif device.startswith("cuda"):
        precisions = ["bf16", "fp32"] if torch.cuda.is_bf16_supported() else ["fp16", "fp32"]
    else:
        bf16_ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        precisions = ["fp32", "bf16"] if bf16_ok else ["fp32"]
    layouts = [True, False] if cfg.channels_last == "auto" else [cfg.channels_last == "on"]
    return [(p, cl) for p in precisions for cl in layouts]


def training_step(model: nn.Module, ex: Execution, shape: tuple[int, ...], classes: int):
    """A function that makes one SGD step of `model` on a fixed random batch of `shape`, as training would."""
    model = ex.prepare(model).train()
    forward = ex.compiled(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(shape, device=ex.device).contiguous(memory_format=ex.memory_format())
    y = torch.randint(0, classes, (shape[0],), device=ex.device)

    def step():
        with ex.autocast():
            loss = nn.functional.cross_entropy(forward(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_steps(model: nn.Module, ex: Execution, shape: tuple[int, ...], classes: int, steps: int = 3,
                warmup: int = 2) -> float:
    step = training_step(model, ex, shape, classes)
    for i in range(steps + warmup):  # warm-up steps: allocator, kernels, oneDNN primitive caches
        if i == warmup:
            _sync(ex.device)
            start = time.perf_counter()
        step()
    _sync(ex.device)
    return (time.perf_counter() - start) / steps


def _default(candidates: list[tuple[str, bool]]) -> tuple[str, bool]:
    """What trains unless another candidate is clearly faster: fp32 before reduced precision, contiguous first."""
    return min(candidates, key=lambda c: (c[0] != "fp32", c[1]))


def pick(speeds: dict[str, float], default: str, margin: float = MARGIN) -> str:
    """The candidate to train with, from images/s per candidate name: the fastest if it beats `default` by more
    than `margin`, else `default`."""
    fastest = max(speeds, key=speeds.get)
    return fastest if speeds[fastest] > speeds[default] * (1 + margin) else default


def measure_candidates(build, cfg: TrainConfig, device: str, shape: tuple[int, ...], classes: int,
                       rounds: int = ROUNDS) -> tuple[Execution, dict[str, float]]:
    """The (precision, layout) to train `build()` with on `device` (`pick`), and images/s of every candidate (the
    best of `rounds` short timings each)."""
    candidates = _candidates(cfg, device)
    if len(candidates) == 1:
        return Execution(candidates[0][0], candidates[0][1], device), {}
    setups = []
    for precision, channels_last in candidates:
        torch.manual_seed(0)
        setups.append((f"{precision}{'-cl' if channels_last else ''}", Execution(precision, channels_last, device),
                       build()))
    timings: dict[str, tuple[float, Execution]] = {}
    for r in range(rounds):  # interleaved, best of rounds: other work on the machine slows a round, not a candidate
        for name, ex, model in setups:
            t = _time_steps(model, ex, shape, classes, warmup=2 if r == 0 else 0)
            if name not in timings or t < timings[name][0]:
                timings[name] = (t, ex)
    speeds = {k: round(shape[0] / t, 1) for k, (t, _) in timings.items()}
    precision, channels_last = _default(candidates)
    chosen = pick(speeds, f"{precision}{'-cl' if channels_last else ''}")
    return timings[chosen][1], speeds


def compile_modes(device: str) -> list[str]:
    """The torch.compile modes a training may use on `device`: inductor's default; on CUDA also CUDA graphs, which
    replay a small student's hundreds of kernel launches as one."""
    return ["default", "reduce-overhead"] if device.startswith("cuda") else ["default"]


# Below this many seconds of eager training (a slot's trainings together, estimated from their steps), compiling is
# not even measured: a first compile costs 25-50 s on the 2-core Xeon here, which a 20% faster step repays only
# over ~250 s of training, and measuring it would cost a fresh machine that much before the first job.
COMPILE_MIN_S = 300.0


def worth_timing_compile(total_steps: int, eager_step_s: float) -> bool:
    """Whether trainings of `total_steps` eager steps in all, of `eager_step_s` each, are worth timing compiled."""
    return total_steps * eager_step_s >= COMPILE_MIN_S


def _compile_time(build, ex: Execution, shape: tuple[int, ...], classes: int) -> tuple[float, nn.Module]:
    """Seconds to the end of the first two steps of a new model under `ex` (its compile, where it compiles) after
    dynamo's in-process cache is cleared, as `train` clears it before compiling (the on-disk caches stay), and the
    model."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build()
    step = training_step(model, ex, shape, classes)
    start = time.perf_counter()
    step()
    step()
    _sync(ex.device)
    return time.perf_counter() - start, model


def measure_compile(build, ex: Execution, shape: tuple[int, ...], classes: int, total_steps: int,
                    rounds: int = ROUNDS, always: bool = False) -> dict:
    """Eager against each torch.compile mode (compile_modes) for training `build()` under `ex` (its precision,
    layout and threads): seconds per step (best of `rounds` timings, each mode's interleaved with eager ones), the
    first compile's seconds (on a machine whose caches do not hold it yet: what this measurement pays once) and a
    later training's (`compile_s`). Only the eager step when `total_steps` of it (every training this timing is for)
    take less than COMPILE_MIN_S, unless `always` (benchmarks/compile_speed.py: what compiling would give); a mode
    that fails to compile or run is recorded with its error."""
    ex = replace(ex, compile="")
    with ex.cpu_threads():
        torch.manual_seed(0)
        eager_model = build()
        eager = _time_steps(eager_model, ex, shape, classes)
        entry: dict = {"eager_step_s": eager, "for_steps": total_steps, "modes": {}}
        if not (always or worth_timing_compile(total_steps, eager)):
            return entry
        for mode in compile_modes(ex.device):
            compiled = replace(ex, compile=mode)
            try:
                first, _ = _compile_time(build, compiled, shape, classes)
                again, model = _compile_time(build, compiled, shape, classes)
                step_s = float("inf")
                for _ in range(rounds):  # this mode's timings right after its compile (the next mode's clears it)
                    eager = min(eager, _time_steps(eager_model, ex, shape, classes, warmup=0))
                    step_s = min(step_s, _time_steps(model, compiled, shape, classes, warmup=1))
            except Exception as exc:  # a model or device the compiler cannot take: trained eagerly, and said why
                from edgekd.pipeline.driver import one_line

                entry["modes"][mode] = {"failed": one_line(exc)}
                continue
            entry["modes"][mode] = {"first_compile_s": first, "compile_s": again, "step_s": step_s}
        entry["eager_step_s"] = eager
    return entry


def compile_choice(entry: dict, steps: int, margin: float = MARGIN) -> tuple[str, str]:
    """The torch.compile mode ("" = eager) a training of `steps` steps takes, from measure_compile's `entry`, and
    why: the mode whose steps plus a later training's compile are estimated fastest, if more than `margin` faster
    than eager steps; else eager."""
    eager = steps * entry["eager_step_s"]
    estimates = {mode: steps * m["step_s"] + m["compile_s"] for mode, m in entry["modes"].items() if "step_s" in m}
    failed = [f"{mode}: {m['failed']}" for mode, m in entry["modes"].items() if "failed" in m]
    if not estimates and failed:
        return "", f"torch.compile failed ({'; '.join(failed)})"
    if not estimates:
        return "", (f"eager: {entry['for_steps']} steps of {entry['eager_step_s'] * 1e3:.1f} ms in all its "
                    f"configuration's trainings, too little to repay compiling (under {COMPILE_MIN_S:g} s)")
    mode = min(estimates, key=estimates.get)
    why = (f"{steps} steps: eager ~{eager:.0f} s, {mode} ~{estimates[mode]:.0f} s with its "
           f"{entry['modes'][mode]['compile_s']:.1f} s compile")
    return (mode, why) if estimates[mode] * (1 + margin) < eager else ("", why)


def machine_identity() -> dict:
    """What a timing depends on besides the model: the CPU (model, speed flags, cores), the GPU, torch."""
    from edgekd.envinfo import cpu_flags, cpu_model

    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__}


class MachineCache:
    """The execution choices measured on this machine, one file per user (~/.cache/edgekd/execution.json, or
    $EDGEKD_EXECUTION_CACHE), keyed by the machine's identity and the training slot: a fresh study reuses them,
    so two studies of one profile on one machine train with the same numerics."""

    def __init__(self, path: Path | None = None):
        setting = os.environ.get(CACHE_ENV, "")
        if path is None and setting.lower() != "none":
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            path = Path(setting) if setting else base / "edgekd" / "execution.json"
        self.path = path
        self.machine = json.dumps(machine_identity(), sort_keys=True)

    def _table(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            table = read_json(self.path)
        except UnreadableFile:  # a damaged cache is measured again, not trusted
            return {}
        return table if isinstance(table, dict) else {}

    def get(self, slot: str) -> dict | None:
        entry = self._table().get(self.machine, {}).get(slot)
        return entry if isinstance(entry, dict) and isinstance(entry.get("choice"), dict) else None

    def put(self, slot: str, entry: dict) -> None:
        if self.path is None:
            return
        table = self._table()
        table.setdefault(self.machine, {})[slot] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, table)
        except OSError:  # a read-only home: the study's plan still records the choice
            pass


def choose_execution(build, cfg: TrainConfig, device: str, shape: tuple[int, ...], classes: int,
                     cache_file: Path | None = None) -> Execution:
    """The fastest (precision, layout) for training `build()` on `device`; measured once, then cached in
    `cache_file` when one is given (a single process's file: a study keeps its choices in its plan instead)."""
    key = f"{cfg.model}|small_input={cfg.small_input}|{device}|{tuple(shape)}|{cfg.precision}|{cfg.channels_last}"
    cache = read_json(cache_file) if cache_file and cache_file.is_file() else {}
    if key in cache:
        return Execution(**cache[key]["choice"])
    best, speeds = measure_candidates(build, cfg, device, shape, classes)
    if cache_file and speeds:
        cache = read_json(cache_file) if cache_file.is_file() else {}
        cache[key] = {"choice": asdict(best), "images_per_s": speeds}
        write_json(cache_file, cache)
    return best
