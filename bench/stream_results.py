"""Benchmark results that survive a killed run, and the short GPU table built from them.

As a pytest plugin (``-p stream_results``, with ``bench/`` on ``PYTHONPATH``), it appends every
measurement to ``$SAGE_FAST_BENCH_STREAM`` as one JSON line the moment the test that took it ends
(flushed and synced), and one line per skipped benchmark with its reason. ``bench/conftest.py`` prints
its table only when the session ends, which a timeout never reaches.

As a script, ``python bench/stream_results.py results.jsonl`` prints the short table: per op and
shape, sage_fast's time, GB/s and share of the measured copy bandwidth, and its speed against eager,
torch.compile and Liger-Kernel, and its peak memory against eager, from whatever lines exist.
"""
from __future__ import annotations

import json
import os
import sys

_written = 0


def _append(record: dict) -> None:
    path = os.environ.get("SAGE_FAST_BENCH_STREAM")
    if not path:
        return
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def pytest_runtest_logreport(report):
    global _written
    if report.when == "call" or (report.when == "setup" and report.skipped):
        import harness  # bench/ is on sys.path (bench/conftest.py)

        for result in harness.RESULTS[_written:]:
            record = {"group": result.group, "impl": result.name, "seconds": result.seconds,
                      "gbps": result.gbps, "peak_bytes": result.peak_bytes, "baseline": result.baseline,
                      "test": report.nodeid, "clock": harness.CLOCK, "scale": harness.SCALE,
                      "extra": {k: v for k, v in result.extra.items()
                                                        if isinstance(v, (int, float, str, bool))}}
            if harness.DEVICE.type == "cuda" and result.gbps is not None:
                record["copy_share"] = result.gbps * 1e9 / harness.copy_bandwidth()
            _append(record)
            print(f"\n[result] {result.group} | {result.name} | {result.seconds * 1e3:.3f} ms"
                  + (f" | {result.gbps:.0f} GB/s" if result.gbps else ""), flush=True)
        _written = len(harness.RESULTS)
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            _append({"skipped": report.nodeid, "reason": reason})
        elif report.failed:
            _append({"failed": report.nodeid, "error": str(report.longrepr)[-600:]})


# ----------------------------------------------------------------------------------- the table

_PEERS = {"eager": ("eager",), "compile": ("compile", "torch.compile"), "liger": ("liger",),
          "ours compiled": ("sage_fast_compiled",)}


def summarize(lines: list[str]) -> str:
    records = [json.loads(line) for line in lines if line.strip()]
    results = [r for r in records if "group" in r]
    groups: dict[str, dict[str, dict]] = {}
    for r in results:
        groups.setdefault(r["group"], {})[r["impl"]] = r  # a rerun of the same test replaces it
    head = (f"{'op and shape':<48} {'time':>10} {'GB/s':>7} {'%copy':>6} {'x eager':>8} {'x compile':>9} "
            f"{'x liger':>8} {'x ours compiled':>15} {'mem/eager':>9}")
    out = [head, "-" * len(head)]
    for group, impls in groups.items():
        ours = impls.get("sage_fast")
        if ours is None:  # suites without a sage_fast row (the kNN and regions stages): every row
            base = next((r for r in impls.values() if r.get("baseline")), None)
            for name, r in impls.items():
                speed = f"{base['seconds'] / r['seconds']:8.2f}" if base else f"{'':>8}"
                out.append(f"{(group + ' ' + name)[:48]:<48} {_ms(r['seconds']):>10} {'':>7} {'':>6} {speed}")
            continue

        def ratio(peer):
            found = next((impls[n] for n in _PEERS[peer] if n in impls), None)
            return f"{found['seconds'] / ours['seconds']:.2f}" if found else "-"

        gbps = f"{ours['gbps']:.0f}" if ours.get("gbps") else "-"
        share = f"{100 * ours['copy_share']:.0f}%" if ours.get("copy_share") else "-"
        eager = next((impls[n] for n in _PEERS["eager"] if n in impls), None)
        mem = (f"{ours['peak_bytes'] / eager['peak_bytes']:.2f}" if eager and ours.get("peak_bytes") is not None
               and eager.get("peak_bytes") else "-")
        out.append(f"{group[:48]:<48} {_ms(ours['seconds']):>10} {gbps:>7} {share:>6} {ratio('eager'):>8} "
                   f"{ratio('compile'):>9} {ratio('liger'):>8} {ratio('ours compiled'):>15} {mem:>9}")
    skipped = [r for r in records if "skipped" in r]
    failed = [r for r in records if "failed" in r]
    if skipped:
        reasons: dict[str, int] = {}
        for r in skipped:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        out.append("skipped: " + "; ".join(f"{n} x {reason}" for reason, n in reasons.items()))
    if failed:
        out.append("failed: " + ", ".join(r["failed"] for r in failed))
    return "\n".join(out)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/stream_results.py RESULTS.jsonl")
    try:
        with open(sys.argv[1]) as fh:
            print(summarize(fh.readlines()))
    except FileNotFoundError:
        print(f"no results ({sys.argv[1]} was never written)")
