"""Benchmark the phantom generator: 2,000 images at 256 px on every CPU against one process (issue 2).

    python bench/phantom_generation.py [--n 2000] [--size 256]

Target: under a minute for 2,000 images at 256 px on 2 cores. Results: bench/results/phantoms.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed, write_result  # noqa: E402

from boneage.config import load_config  # noqa: E402
from boneage.phantoms.generate import generate_phantoms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, os.cpu_count() or 1):
            cfg = load_config(overrides=[f"phantoms.out={tmp}/w{workers}", f"phantoms.n={args.n}",
                                         f"phantoms.size={args.size}", f"phantoms.workers={workers}"])
            seconds = timed(lambda: generate_phantoms(cfg))
            results[f"processes_{workers}"] = {"seconds": seconds, "images_per_s": args.n / seconds}
            print(f"{workers} process(es): {seconds:.1f} s, {args.n / seconds:.0f} images/s")
    write_result("phantoms", {"n": args.n, "size": args.size, "target_seconds": 60, **results})


if __name__ == "__main__":
    main()
