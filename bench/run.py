"""``make bench``: speed as ratios against a named baseline measured in the same run, never as test assertions.

Each section is a module in this folder with ``run() -> dict`` (its keys are fixed by the issue that asked for it).
Results are merged into ``bench-results.json`` at the repo root and printed as a table. Several sections run one
after another, each in its own process. Every run first measures the machine (``bench.machine``: CPU, bf16 support,
matmul peak), stores it under ``machine`` and prints it above the table.

Keys are flat. In the table, ``X_min`` / ``X_max`` fold into X's row as its spread (over the alternating repeats),
``X_goal`` as its goal (a lower bound: the goal is met when X >= goal) and ``X_ceiling`` as an upper bound (met when
X <= ceiling).

    python -m bench.run [section ...]     # default: every section
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench-results.json"
SECTIONS = ("train", "embed", "upsert", "e2e", "scale")


FOLDED = ("_min", "_max", "_goal", "_ceiling")


def spread(key: str, values: list[float], digits: int = 3, prefix: str = "") -> dict:
    """A repeated measurement as the table shows it: the median under ``key``, its min..max folded beside it."""
    return {
        f"{prefix}{key}": round(statistics.median(values), digits),
        f"{prefix}{key}_min": round(min(values), digits),
        f"{prefix}{key}_max": round(max(values), digits),
    }


def _shown(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table(results: dict) -> str:
    """One row per metric; a metric's ``_min``/``_max`` become its spread column and ``_goal`` its goal column."""
    head = f"{'section':<8} {'metric':<28} {'value':>12} {'spread (min..max)':>20} {'goal':>10}  met"
    lines = [head, "-" * len(head)]
    for section, values in results.items():
        for key, value in values.items():
            if key.endswith(FOLDED) and key.rsplit("_", 1)[0] in values:
                continue
            spread = goal = met = ""
            if f"{key}_min" in values and f"{key}_max" in values:
                spread = f"{_shown(values[f'{key}_min'])}..{_shown(values[f'{key}_max'])}"
            if f"{key}_goal" in values:
                goal = f">= {values[f'{key}_goal']}"
                if isinstance(value, int | float):
                    met = "yes" if value >= values[f"{key}_goal"] else "NO"
            elif f"{key}_ceiling" in values:
                goal = f"<= {values[f'{key}_ceiling']}"
                if isinstance(value, int | float):
                    met = "yes" if value <= values[f"{key}_ceiling"] else "NO"
            lines.append(f"{section:<8} {key:<28} {_shown(value):>12} {spread:>20} {goal:>10}  {met}")
    return "\n".join(lines)


def report(results: dict, wanted: list[str]) -> str:
    from bench.machine import line

    head = line(results["machine"]) + "\n\n" if "machine" in results else ""
    return head + table({s: results[s] for s in wanted if s in results})


def main(argv: list[str]) -> int:
    from embedpipe.jobs.spec import ALLOCATOR_ENV

    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        # Run as the embedding jobs do (allocator settings are read at process start); baselines share the process.
        os.execve(sys.executable, [sys.executable, "-m", "bench.run", *argv], {**os.environ, **ALLOCATOR_ENV})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wanted = argv or [s for s in SECTIONS if (Path(__file__).parent / f"{s}.py").exists()]
    from bench import machine

    print("== bench machine ...", file=sys.stderr, flush=True)
    measured = machine.report()  # once per run: exported in BENCH_MACHINE to the section processes
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = measured
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if len(wanted) > 1:  # each section in a fresh process: no heap, thread or cache state carried from the one before
        for section in wanted:
            subprocess.run([sys.executable, "-m", "bench.run", section], check=True, stdout=subprocess.DEVNULL)
        results = json.loads(RESULTS.read_text())
        print(report(results, wanted))
        print(f"\nwritten to {RESULTS}")
        return 0
    for section in wanted:
        t0 = time.time()
        print(f"== bench {section} ...", file=sys.stderr, flush=True)
        results[section] = importlib.import_module(f"bench.{section}").run()
        print(f"== bench {section} done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(report(results, wanted))
    print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
