"""How much of the ASHA benchmark's outcome is luck of the trial order: replay ASHA's stopping rule on its full curves.

    python bench/asha_replay.py [--orders 2000] [--concurrency 3] [--source bench/results/asha_savings.json]

Reads the per-epoch val MAE of every trial run to the end (bench/results/asha_savings.json, written by
bench/asha_savings.py), replays asynchronous successive halving on them in many random trial orders, and reports for
each grace period / reduction factor how often ASHA keeps the full sweep's best trial (lets it run to the epoch of its
best val MAE, which no other trial beats) and what it saves. The rule is
Tune's: at each rung a trial goes on only if its value is within the best 1/factor of those recorded there before it
(the first arrival always goes on). Epochs are taken to last equally long, which Tune's real timing only
approximates. Results: bench/results/asha_replay.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402

SETTINGS = [(grace, factor) for grace in (1, 2, 3, 4) for factor in (2, 3, 4)]


def epochs_run(curves: dict[str, list[float]], order: list[str], grace: int, factor: int, concurrency: int,
               max_epochs: int) -> dict[str, int]:
    """Replay ASHA over ``order`` with ``concurrency`` trials at a time; return the epochs each trial ran."""
    rungs = {grace * factor ** k: [] for k in range(max_epochs) if grace * factor ** k < max_epochs}
    pending, running, ran = list(order), [], {}
    for _ in range(min(concurrency, len(pending))):
        heapq.heappush(running, (1, pending.pop(0), 1))  # (time, trial, epoch it just finished)
    while running:
        now, trial, epoch = heapq.heappop(running)
        value, recorded = curves[trial][epoch - 1], rungs.get(epoch)
        stopped = recorded is not None and bool(recorded) and value > np.percentile(recorded, 100 / factor)
        if recorded is not None:
            recorded.append(value)
        if stopped or epoch == max_epochs:
            ran[trial] = epoch
            if pending:
                heapq.heappush(running, (now + 1, pending.pop(0), 1))
        else:
            heapq.heappush(running, (now + 1, trial, epoch + 1))
    return ran


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=3, help="trials at once (the benchmark's sweep ran 3)")
    parser.add_argument("--source", type=Path, default=RESULTS / "asha_savings.json")
    args = parser.parse_args()
    source = json.loads(args.source.read_text())
    curves = {name.split()[0]: [float(v) for v in values.split()]
              for name, values in source["val_mae_by_epoch"]["fifo"].items()}
    max_epochs, names = source["max_epochs"], sorted(curves)
    winner = next(iter(curves))  # the full sweep's leaderboard order: exact, where the stored curves are rounded
    best_epoch = 1 + int(np.argmin(curves[winner]))
    rng = random.Random(0)
    orders = [rng.sample(names, len(names)) for _ in range(args.orders)]
    results = {}
    for grace, factor in SETTINGS:
        kept, savings = [], []
        for order in orders:
            ran = epochs_run(curves, order, grace, factor, args.concurrency, max_epochs)
            kept.append(ran[winner] >= best_epoch)
            savings.append(len(names) * max_epochs / sum(ran.values()))
        row = {"same_best": float(np.mean(kept)), "savings_median": float(np.median(savings)),
               "savings_min": float(min(savings)),
               "same_best_and_2x": float(np.mean([k and s >= 2.0 for k, s in zip(kept, savings)]))}
        results[f"grace {grace}, factor {factor}"] = row
        print(f"grace {grace}, factor {factor}: same best in {row['same_best']:.1%} of orders, savings median "
              f"{row['savings_median']:.2f}x (min {row['savings_min']:.2f}x), both at once {row['same_best_and_2x']:.1%}")
    write_result("asha_replay", {"source": source["when"], "pretrain_epochs": source.get("pretrain_epochs", 0),
                                 "orders": args.orders, "concurrency": args.concurrency, "winner": winner,
                                 "settings": results})


if __name__ == "__main__":
    main()
