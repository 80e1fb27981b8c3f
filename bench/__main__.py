"""Run the benchmark suite: ``python -m bench [--json FILE]``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import core


def main() -> int:
    """Run every benchmark, print a table, write JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--json", default="bench/results/latest.json", help="where to write JSON")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    runs: list[Callable[[], dict[str, Any]]] = [
        lambda: core.capture_to_queue("FULL"),
        lambda: core.capture_to_queue("NORMAL"),
        lambda: core.withdrawal(10_000, "FULL"),
    ]
    for run in runs:
        res = run()
        results.append(res)
        figures = ", ".join(f"{k}={v:.2f}" for k, v in res.items() if k != "name")
        print(f"{res['name']:<40} {figures}", flush=True)
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": sys.version.split()[0],
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
