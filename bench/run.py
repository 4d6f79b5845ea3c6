"""``make bench``: speed as ratios against a named baseline measured in the same run, never as test assertions.

Each section is a module in this folder with ``run() -> dict`` (its keys are fixed by the issue that asked for it).
Results are merged into ``bench-results.json`` at the repo root and printed as a table. Several sections run one
after another, each in its own process.

    python -m bench.run [section ...]     # default: every section
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench-results.json"
SECTIONS = ("train", "embed", "upsert", "e2e")


def table(results: dict) -> str:
    lines = [f"{'section':<8} {'metric':<24} {'value':>14}", "-" * 48]
    for section, values in results.items():
        for key, value in values.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{section:<8} {key:<24} {shown:>14}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from embedpipe.jobs import ALLOCATOR_ENV

    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        # Run as the embedding jobs do (allocator settings are read at process start); baselines share the process.
        os.execve(sys.executable, [sys.executable, "-m", "bench.run", *argv], {**os.environ, **ALLOCATOR_ENV})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wanted = argv or [s for s in SECTIONS if (Path(__file__).parent / f"{s}.py").exists()]
    if len(wanted) > 1:  # each section in a fresh process: no heap, thread or cache state carried from the one before
        for section in wanted:
            subprocess.run([sys.executable, "-m", "bench.run", section], check=True, stdout=subprocess.DEVNULL)
        results = json.loads(RESULTS.read_text())
        print(table({s: results[s] for s in wanted}))
        print(f"\nwritten to {RESULTS}")
        return 0
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for section in wanted:
        t0 = time.time()
        print(f"== bench {section} ...", file=sys.stderr, flush=True)
        results[section] = importlib.import_module(f"bench.{section}").run()
        print(f"== bench {section} done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(table({s: results[s] for s in wanted}))
    print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
