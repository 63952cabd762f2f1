"""Shared benchmark harness: time an op and its peers in the same run, count bytes, report ratios.

Every suite measures one op against its peers (PyTorch eager, ``torch.compile``, Liger-Kernel where
it computes the same thing) on the same inputs, through :func:`measure`. Each measurement lands in
pytest-benchmark's stats and JSON (``extra_info``) and in a session table printed at the end
(``bench/conftest.py``): median time, ratio against the group's baseline, achieved GB/s and its
share of the measured copy bandwidth, and peak memory against the baseline.

One clock times everything, :func:`benchmark_clock`, and ``bench/conftest.py`` hands it to
pytest-benchmark as its timer, so the session table, pytest-benchmark's own table and its
``--benchmark-compare-fail`` check all read the same samples (the table takes pytest-benchmark's
median). On CUDA it reads CUDA events (each read synchronises, after warm-up; ``ROUNDS`` rounds);
peak memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the call. On CPU
it is the process's CPU time (the work of all its threads, which load from other processes cannot
inflate; ``SAGE_FAST_BENCH_CLOCK=wall`` for wall-clock), with one torch intra-op thread
(``SAGE_FAST_BENCH_THREADS`` overrides); peak memory is the high-water mark of torch's allocator
during the call, from the profiler's memory events. CPU numbers are only meaningful as ratios within
one run. The clock's name and ``SCALE`` go into every measurement's ``extra_info`` and the JSON.
"""
from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

DEVICE = torch.device(os.environ.get("SAGE_FAST_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
#: Scale every suite's problem sizes down (e.g. 0.05) for a quick smoke run.
SCALE = float(os.environ.get("SAGE_FAST_BENCH_SCALE", "1"))


#: Timed rounds per measurement (each a sample of the one clock).
ROUNDS = int(os.environ.get("SAGE_FAST_BENCH_REPS", "25" if DEVICE.type == "cuda" else "7"))


def _cuda_event_clock() -> float:
    """Seconds of GPU time since the first read: records an event and waits for it, so a read after
    a launch is a read after the work (the same synchronisation as timing with two events)."""
    global _cuda_origin
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    if _cuda_origin is None:
        _cuda_origin = event
    return _cuda_origin.elapsed_time(event) / 1e3


_cuda_origin = None

if DEVICE.type == "cuda" and os.environ.get("SAGE_FAST_BENCH_CLOCK") != "wall":
    benchmark_clock, CLOCK = _cuda_event_clock, "cuda events"
elif os.environ.get("SAGE_FAST_BENCH_CLOCK") == "wall" or DEVICE.type == "cuda":
    benchmark_clock, CLOCK = time.perf_counter, "wall"
else:
    benchmark_clock, CLOCK = time.process_time, "process cpu time"


def scaled(n: int, minimum: int = 1) -> int:
    return max(minimum, int(n * SCALE))


@dataclass
class Result:
    group: str
    name: str
    seconds: float
    bytes_moved: float | None = None
    flops: float | None = None
    peak_bytes: int | None = None
    baseline: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float | None:
        return None if not self.bytes_moved else self.bytes_moved / self.seconds / 1e9


#: Every measurement of the session, in order; bench/conftest.py prints them as a table.
RESULTS: list[Result] = []


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def copy_bandwidth() -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a buffer larger than L2)."""
    nbytes = (1 << 30) if DEVICE.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src))
    return 2 * nbytes / seconds


def time_call(fn, *, warmup: int = 3, rep: int | None = None) -> float:
    """Median seconds of ``fn()`` after warm-up (the copy bandwidth's reference measurement)."""
    if DEVICE.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep or ROUNDS):
        start = benchmark_clock()
        fn()
        times.append(benchmark_clock() - start)
    return statistics.median(times)


def peak_memory(fn) -> int:
    """Bytes allocated by ``fn()`` at its high-water mark, beyond what existed before the call."""
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - before
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The "[memory]" events carry the allocator's running total; their maximum, less the total
    # before the first event, is the high-water mark. (Summing per-op memory by start time does not
    # work: parent ops such as autograd nodes report their children's frees at their own start.)
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        with open(trace.name) as fh:
            events = json.load(fh).get("traceEvents", [])
    totals = [(e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events
              if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    if not totals:
        return 0
    totals.sort()
    start = totals[0][1] - totals[0][2]
    return max(t for _, t, _ in totals) - start


def measure(benchmark, group: str, name: str, fn, *, bytes_moved: float | None = None, flops: float | None = None,
            baseline: bool = False, memory: bool = True, **extra) -> Result:
    """Time ``fn`` under pytest-benchmark (and CUDA events on a GPU) and record it in the session table.

    pytest-benchmark allows one measurement per test, so peers are parametrizations of one test
    that share ``group``.

    ``baseline=True`` marks the entry the others in ``group`` are compared with (PyTorch eager).
    ``bytes_moved`` is the minimum traffic the op must do (each input read once, each output written
    once); achieved GB/s is reported against it.
    """
    def call():
        fn()
        sync()

    # The rounds pytest-benchmark runs are the samples: each is also timed here on the same clock,
    # for runs with --benchmark-disable (one call, no statistics), so a slow stage such as a UMAP fit
    # runs no more often than the rounds asked for.
    samples = []

    def timed_call():
        start = benchmark_clock()
        call()
        samples.append(benchmark_clock() - start)

    call()  # compile / autotune / first-touch before anything is timed
    benchmark.group = group
    benchmark.pedantic(timed_call, rounds=ROUNDS, iterations=1)
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None and not benchmark.disabled else statistics.median(samples)
    peak = peak_memory(call) if memory else None
    result = Result(group, name, seconds, bytes_moved, flops, peak, baseline, extra)
    RESULTS.append(result)
    info = {"median_s": seconds, "device": str(DEVICE), "clock": CLOCK, "scale": SCALE, **extra}
    if result.gbps is not None:
        info["GB/s"] = result.gbps
        if DEVICE.type == "cuda":
            info["copy_bandwidth_share"] = result.gbps * 1e9 / copy_bandwidth()
    if peak is not None:
        info["peak_bytes"] = peak
    benchmark.extra_info.update(info)
    return result


def compiled(fn, fullgraph: bool = False):
    """``torch.compile`` of a peer, or None where compilation is unavailable here. ``fullgraph=True``
    for sage_fast's own ops: a graph break is then an error, not a slower column."""
    try:
        return torch.compile(fn, dynamic=False, fullgraph=fullgraph)
    except Exception:  # noqa: BLE001 - a missing compiler backend just drops this peer
        return None


def liger_available() -> bool:
    if DEVICE.type != "cuda":
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or built for another Triton: either way its peer is skipped
        return False
    return True


def table() -> str:
    """The session's measurements, grouped, with ratios against each group's baseline."""
    if not RESULTS:
        return ""
    lines = [f"device: {DEVICE}" + (f", copy bandwidth {copy_bandwidth() / 1e9:.0f} GB/s" if DEVICE.type == "cuda" else "")]
    width = max(len(r.group) for r in RESULTS)
    header = f"{'group':<{width}} {'impl':<14} {'median':>10} {'speedup':>8} {'GB/s':>8} {'%copy':>6} {'peak MB':>9} {'mem x':>6}"
    lines += [header, "-" * len(header)]
    groups: dict[str, list[Result]] = {}
    for r in RESULTS:
        groups.setdefault(r.group, []).append(r)
    for group, results in groups.items():
        base = next((r for r in results if r.baseline), results[0])
        for r in results:
            speedup = base.seconds / r.seconds
            gbps = f"{r.gbps:8.1f}" if r.gbps is not None else f"{'':>8}"
            share = (f"{100 * r.gbps * 1e9 / copy_bandwidth():5.0f}%" if r.gbps is not None and DEVICE.type == "cuda"
                     else f"{'':>6}")
            peak = f"{r.peak_bytes / 2**20:9.1f}" if r.peak_bytes is not None else f"{'':>9}"
            mem = (f"{r.peak_bytes / base.peak_bytes:6.2f}" if r.peak_bytes is not None and base.peak_bytes
                   else f"{'':>6}")
            lines.append(f"{group:<{width}} {r.name:<14} {_fmt_time(r.seconds):>10} {speedup:8.2f} {gbps} {share} {peak} {mem}")
    return "\n".join(lines)


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"
