"""One process of a benchmarked ``o2m distill`` run: runs the CLI, then appends this process's peak memory.

``python benchmarks/distill_rank.py RSS_FILE distill ARGS...`` (or under ``torchrun``): after the run, one
JSON line ``{"rank": r, "world": W, "max_rss_mib": ...}`` (``resource.getrusage`` ru_maxrss) is appended
to RSS_FILE. Used by ``bench_distill.py --parallel``.
"""

from __future__ import annotations

import json
import os
import resource
import sys


def main() -> None:
    rss_file = sys.argv[1]
    sys.argv = ["o2m", *sys.argv[2:]]
    from o2mcli.cli import main as cli_main

    code = 0
    try:
        cli_main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open(rss_file, "a") as f:
        f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "world": int(os.environ.get("WORLD_SIZE", 1)),
                            "max_rss_mib": round(peak, 1)}) + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
