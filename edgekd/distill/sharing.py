"""How many trainings share one device, and with how many CPU threads each: chosen by measuring, like precision.

Small students leave a device mostly idle. On this project's 2-core CPU a quickstart student trains 1.27x slower on
one thread than on two, so two side by side do about 1.6x the work of one; an H100 trained a small MobileNet at
4.2k img/s where it runs a larger one at 27.6k. So k trainings at once (k = 1, 2, 4, 8, each with 1/k of the
threads, and on a GPU 1/k of it) are timed the way the study will run them: k spawned processes each train the
study's student for the same window, all at once, and their images/s are summed.

On a CPU the threads per training change float rounding (a reduction split over two threads adds in another order),
so the choice is a numerics choice: it leaves one training with every thread only for a clearly faster candidate
(MARGIN), it is kept per machine (MachineCache) and recorded in the plan, and every executor trains with its
threads (local one after the other, processes and Ray side by side): the same numbers on each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgekd.distill.execution import MARGIN, Execution, pick, training_step
from edgekd.errors import EdgeKDError

ROUNDS = 2  # interleaved, best of each: other work on the machine slows a round, not a candidate
WINDOW_S = 0.6  # each candidate's trainings step for this long, all at once
MOST = 8  # never more trainings at once than this: each holds a process, a model and its data


@dataclass(frozen=True)
class Sharing:
    trainings: int  # side by side on one device
    threads: int  # CPU threads of each

    @property
    def name(self) -> str:
        return f"{self.trainings}x{self.threads}"


def candidates(cores: int, device: str) -> list[Sharing]:
    """One training with every thread first (the default), then 2, 4, 8 side by side with their share."""
    most = MOST if device.startswith("cuda") else min(MOST, cores)
    return [Sharing(k, max(1, cores // k)) for k in (1, 2, 4, 8) if k <= most]


def _trainer(conn, spec: tuple) -> None:
    """A spawned process that trains one model on a fixed batch when told: (threads, window, warm-up steps) ->
    'ready'; then a start time -> images/s over the window."""
    import torch

    from edgekd.models import create_model

    model_name, classes, channels, small_input, shape, execution = spec
    ex = Execution(**execution)
    torch.manual_seed(0)
    step = training_step(create_model(model_name, classes, channels, small_input, False), ex, shape, classes)
    cuda = ex.device.startswith("cuda")
    while (order := conn.recv()) is not None:
        threads, window, warmup = order
        torch.set_num_threads(threads)
        for _ in range(warmup):  # oneDNN primitives are made per thread count; CUDA kernels are picked
            step()
        if cuda:
            torch.cuda.synchronize()
        conn.send("ready")
        start_at = conn.recv()
        while time.time() < start_at:
            time.sleep(0.0005)
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < window:
            step()
            steps += 1
        if cuda:
            torch.cuda.synchronize()
        conn.send(steps * shape[0] / (time.perf_counter() - start))


def _time_option(conns: list, option: Sharing, window: float, warmup: int) -> float | None:
    """Summed images/s of `option.trainings` trainers stepping at once for `window` seconds; None if one died."""
    used = conns[:option.trainings]
    try:
        for conn in used:
            conn.send((option.threads, window, warmup))
        for conn in used:
            conn.recv()
        start_at = time.time() + 0.05
        for conn in used:
            conn.send(start_at)
        return sum(conn.recv() for conn in used)
    except (EOFError, OSError):  # a trainer died (out of memory with k models on a GPU)
        return None


def measure_sharing(spec: tuple, cores: int, device: str, rounds: int = ROUNDS,
                    window: float = WINDOW_S) -> tuple[Sharing, dict[str, float]]:
    """The trainings at once to run on `device` (`pick` over summed images/s, one training with every thread
    unless clearly slower) and the images/s of every candidate. `spec`: (model name, classes, channels,
    small_input, batch shape, execution as a dict), what each spawned trainer builds."""
    import multiprocessing

    options = candidates(cores, device)
    if len(options) == 1:
        return options[0], {}
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each, as the processes executor's workers
    conns, procs = [], []
    for _ in range(options[-1].trainings):
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_trainer, args=(there, spec), daemon=True)
        proc.start()
        conns.append(here)
        procs.append(proc)
    speeds: dict[str, float] = {}
    try:
        for r in range(rounds):
            for option in options:
                rate = _time_option(conns, option, window, 3 if r == 0 else 1)
                if rate is None and option.trainings == 1:
                    raise EdgeKDError(f"measuring trainings at once: the process training {spec[0]} alone died; "
                                      "set study.trainings_at_once = 1 to train without measuring")
                if rate is None:  # the others are mid-exchange: stop, keeping only the options before this one
                    options = options[:options.index(option)]
                    speeds = {o.name: speeds[o.name] for o in options if o.name in speeds}
                    break
                speeds[option.name] = max(speeds.get(option.name, 0.0), round(rate, 1))
            if rate is None:
                break
    finally:
        for conn, proc in zip(conns, procs, strict=True):
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    chosen = pick(speeds, options[0].name, MARGIN) if speeds else options[0].name
    return next(o for o in candidates(cores, device) if o.name == chosen), speeds
