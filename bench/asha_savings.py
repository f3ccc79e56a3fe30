"""Benchmark the compute ASHA saves: the same sweep with early stopping and with every trial run to the end.

    python bench/asha_savings.py [--trials 16] [--max-epochs 10] [--grace-period 2] [--reduction-factor 3]
                                 [--phantoms 900] [--pretrain-epochs 8]

Both sweeps draw the same trials (same sampler seed) on the same phantoms; one schedules them with ASHA
(--grace-period, --reduction-factor), the other runs each to --max-epochs. Reported: trial-epochs spent by each,
their ratio, and whether both pick the same best configuration. Target: at least 2x fewer trial-epochs for the
same best configuration. Results: bench/results/asha_savings.json.

The trials fine-tune a pretrained backbone, as sweeps do in production (from ImageNet weights, which cannot be
downloaded here): first the training job learns one on a disjoint phantom set (--pretrain-epochs; 0 starts every
trial from random weights). From random weights every trial sits at the predict-the-mean baseline for its first
1,300-1,700 images and then takes off at a moment that depends on its learning rate, so ASHA's first rung ranks
take-off times rather than configurations.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from boneage.bundle import WEIGHTS  # noqa: E402
from boneage.config import load_config  # noqa: E402
from boneage.phantoms.generate import generate_phantoms  # noqa: E402
from boneage.prepare import prepare_dataset  # noqa: E402
from boneage.train import run_training  # noqa: E402
from boneage.tune import run_sweep  # noqa: E402

SPACE = ("{model.head: {choice: [[64], [256], [512, 128]]}, train.lr: {loguniform: [1.0e-4, 3.0e-3]}, "
         "model.dropout: {uniform: [0.0, 0.5]}}")


def phantom_job(work: Path, phantoms: int, seed: int) -> list[str]:
    """Settings of a job on ``phantoms`` phantoms drawn with ``seed``, trained at 32 px, everything under ``work``."""
    return [f"phantoms.out={work / 'phantoms'}", f"phantoms.n={phantoms}", f"phantoms.seed={seed}",
            "phantoms.size=128", f"data.labels={work / 'phantoms' / 'boneage-training-dataset.csv'}",
            f"data.images={work / 'phantoms'}", f"data.out={work / 'prepared'}", "data.image_size=32",
            "train.batch_size=16", "train.threads_per_worker=1", f"train.storage_path={work / 'runs'}",
            f"registry.root={work / 'registry'}"]


def pretrain_backbone(work: Path, phantoms: int, epochs: int) -> Path:
    """Train the job on phantoms of another seed (none shared with the sweep's); return its weights file."""
    cfg = load_config("configs/demo.yaml", [*phantom_job(work, phantoms, seed=1), f"train.epochs={epochs}",
                                            "train.lr=5e-4"])
    generate_phantoms(cfg)
    prepare_dataset(cfg)
    outcome = run_training(cfg)
    print(f"pretrained backbone: val MAE {outcome.metrics['val_mae']:.2f} months after {epochs} epochs", flush=True)
    return outcome.bundle / WEIGHTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--reduction-factor", type=int, default=3)
    # 900 phantoms: 630 training images per epoch. From random weights (--pretrain-epochs 0) that is just enough
    # for learning to show by the grace period; with 600, every trial sat at the baseline for two epochs.
    parser.add_argument("--phantoms", type=int, default=900)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    args = parser.parse_args()
    ray.init(num_cpus=4, log_to_driver=False)  # with the dashboard: sweeps need its State API
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = [*phantom_job(work / "sweep", args.phantoms, seed=0), f"tune.search_space={SPACE}",
                f"tune.num_samples={args.trials}", f"tune.max_epochs={args.max_epochs}",
                f"tune.grace_period={args.grace_period}", f"tune.reduction_factor={args.reduction_factor}",
                "tune.seed=0"]
        if args.pretrain_epochs:
            base.append(f"model.weights={pretrain_backbone(work / 'pretrain', args.phantoms, args.pretrain_epochs)}")
        cfg = load_config("configs/demo.yaml", base)
        generate_phantoms(cfg)
        prepare_dataset(cfg)
        tables, seconds = {}, {}
        for scheduler in ("asha", "fifo"):
            sweep = load_config("configs/demo.yaml", [*base, f"tune.scheduler={scheduler}",
                                                      f"tune.sweep_name=bench-{scheduler}"])
            started = time.perf_counter()
            tables[scheduler] = run_sweep(sweep).table
            seconds[scheduler] = time.perf_counter() - started
    ray.shutdown()
    keys = ["model.head", "train.lr", "model.dropout"]
    epochs = {name: int(table["epochs"].sum()) for name, table in tables.items()}
    best = {name: {k: table.iloc[0][k] for k in keys} for name, table in tables.items()}
    same_configs = sorted(map(str, tables["asha"][keys].values.tolist())) == sorted(
        map(str, tables["fifo"][keys].values.tolist()))
    same_best = str(best["asha"]) == str(best["fifo"])
    ratio = epochs["fifo"] / epochs["asha"]
    print(f"trial-epochs: ASHA {epochs['asha']}, all to the end {epochs['fifo']}: {ratio:.2f}x fewer; "
          f"same trials: {same_configs}; same best configuration: {same_best}")
    write_result("asha_savings", {
        "trials": args.trials, "max_epochs": args.max_epochs, "grace_period": args.grace_period,
        "reduction_factor": args.reduction_factor, "phantoms": args.phantoms,
        "pretrain_epochs": args.pretrain_epochs, "trial_epochs": epochs,
        "sweep_seconds": seconds,
        "savings_ratio": ratio, "same_trials_drawn": same_configs, "same_best_configuration": same_best,
        "best": {k: {kk: str(vv) for kk, vv in v.items()} for k, v in best.items()},
        "best_val_mae": {name: float(table.iloc[0]["best_val_mae"]) for name, table in tables.items()},
        "val_mae_by_epoch": {name: {f"{row['trial']} {row['model.head']} lr {row['train.lr']:.2e} dropout "
                                    f"{row['model.dropout']:.2f}": row["val_mae"] for _, row in table.iterrows()}
                             for name, table in tables.items()},
        "target_savings_ratio": 2.0,
    })


if __name__ == "__main__":
    main()
