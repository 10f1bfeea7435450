"""Timing and FLOP counting shared by the benchmarks."""
import statistics
import time


def median_seconds(fn, repeats: int) -> float:
    """Median wall-clock time of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(a, b, repeats: int) -> tuple[float, float]:
    """Median times of ``a()`` and ``b()``, alternated so that load from elsewhere on the machine hits both alike."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(median_seconds(a, 1))
        tb.append(median_seconds(b, 1))
    return statistics.median(ta), statistics.median(tb)


def wall_seconds(fn) -> float:
    """Wall-clock seconds of one ``fn()`` call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_step_medians(steps: dict, repeats: int, clock=wall_seconds, warmup: int = 1) -> dict:
    """Median seconds per named step: each warmed up ``warmup`` times, then the steps called in turn ``repeats``
    times, each call timed by ``clock(fn)``, so that load from elsewhere on the machine hits all of them alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            times[name].append(clock(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def count_flops(fn) -> int:
    """FLOPs of one ``fn()`` call, counted by ``torch.utils.flop_counter.FlopCounterMode`` (not timed).

    ``nn.MultiheadAttention``'s fused inference fast path (no grad, no autocast: a frozen reference in fp32) is one
    op the counter has no formula for, so its projections and attention would count as nothing (a third of a frozen
    ViT-B-32 image tower); it is off while counting, for the same arithmetic unfused.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()
