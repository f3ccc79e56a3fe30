"""Issue 15, section 4: an ensemble of a sweep's best 3 trials against its best single member, on the real
RSNA thumbnails' test split, with the same training budget per member.

    python bench/ensemble.py [--trials 4] [--epochs 3] [--members 3] [--image-size 64] [--data DIR]

Prepares the real thumbnails at ``--image-size`` px (reused when prepared already), then runs (or, rerun, resumes) a
sweep of ``--trials`` trials with Ray Tune's FIFO scheduler, so every trial trains the same ``--epochs`` epochs: the
members' budgets are equal. The search space draws each trial's seed (its initial weights), head and learning
rate. ``jobs/tune.py``'s own export (``tune.ensemble_size=--members``) writes the best trials as one ensemble
bundle. The test split is then read by the ensemble and by each of its members alone (their raw answers, from the
ensemble bundle itself) and the MAEs compared: the ensemble's raw answers against the best member's (the lowest
val MAE, the one a sweep without ensembles would have exported). Target: at least 5% lower MAE. Also recorded: the
ensemble's served (bias-corrected) MAE and interval coverage, and how the members' spread tracks the error.
Results: bench/results/ensemble.json. On 2 CPU cores a 3-epoch trial at 64 px takes ~12 minutes; compute goes with
the square of the image size.

``--finished-trials-only`` exports from the trials the sweep finished (all ``--epochs``), without running the
others: for a sweep stopped early; the result says how many trials there were.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from boneage.bundle import load_bundle  # noqa: E402
from boneage.config import load_config  # noqa: E402
from boneage.dataset import load_split  # noqa: E402
from boneage.inference import BoneAgePredictor  # noqa: E402
from boneage.prepare import prepare_dataset  # noqa: E402
from boneage.signals import in_batches  # noqa: E402
from boneage.train import plan_run  # noqa: E402
from boneage.tune import export_best, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
THUMBS = ROOT.parent / "shared" / "data" / "rsna-thumbs"
OUT = ROOT / "outputs" / "bench"
SPACE = ("{train.seed: {randint: [1, 10000]}, model.head: {choice: [[256], [512, 128]]}, "
         "train.lr: {loguniform: [5.0e-4, 2.0e-3]}}")


def sweep_settings(data: Path, trials: int, epochs: int, members: int, size: int) -> list[str]:
    """The demo's CPU training settings on the real thumbnails at ``size`` px, swept without early stopping."""
    return [f"data.labels={data / 'boneage-training-dataset.csv'}", f"data.images={data}",
            f"data.out={OUT / 'rsna-thumbs' / f'prepared-{size}'}", f"data.image_size={size}",
            f"train.storage_path={OUT / 'ensemble' / 'ray_results'}", f"registry.root={OUT / 'ensemble' / 'registry'}",
            "registry.name=boneage-vgg16-rsna-thumbs-ensemble", f"tune.num_samples={trials}",
            f"tune.max_epochs={epochs}", "tune.scheduler=fifo", f"tune.sweep_name=ensemble-thumbs-{size}-{epochs}ep",
            f"tune.search_space={SPACE}", f"tune.ensemble_size={members}"]


def test_figures(bundle: Path, prepared: Path) -> dict:
    """MAE on the test split: the ensemble (raw and served) and each member alone; coverage; spread vs error."""
    split = load_split(prepared, "test")
    canvases, male = split["image"][:, 0].numpy(), split["male"].numpy().astype(bool)
    true = split["boneage"].numpy().astype(np.float64)
    predictor = BoneAgePredictor(load_bundle(bundle))
    members = np.concatenate([predictor.members_raw(canvases[i:i + 64], male[i:i + 64])
                              for i in range(0, len(canvases), 64)], axis=1)  # (K, N)
    raw = members.mean(axis=0)
    served = predictor.correct(raw)
    low, high = predictor.interval(served, male)
    spread = members.std(axis=0, ddof=1)
    error = np.abs(raw - true)
    ranks = [np.argsort(np.argsort(values)) for values in (spread, error)]
    meta = predictor.bundle.meta
    member_mae = [float(np.abs(m - true).mean()) for m in members]
    best = member_mae[0]  # members are stored best (lowest val MAE) first
    return {"test_images": int(len(true)),
            "members": [{"run": m.run, "head": m.model.head, "lr": m.train.get("lr"), "seed": m.train.get("seed"),
                         "val_mae": m.val_mae, "test_mae": mae} for m, mae in zip(meta.members, member_mae)],
            "ensemble_val_mae": meta.val_mae,
            "best_member_test_mae": best, "ensemble_test_mae_raw": float(error.mean()),
            "ensemble_test_mae_served": float(np.abs(served - true).mean()),
            "mae_reduction_vs_best_member": 1.0 - float(error.mean()) / best,
            "mae_reduction_vs_best_member_on_test": 1.0 - float(error.mean()) / min(member_mae),
            "interval_coverage_90": float(((true >= low) & (true <= high)).mean()),
            "spread_months_mean": float(spread.mean()),
            "spread_error_spearman": float(np.corrcoef(*ranks)[0, 1]),
            "ood_test_hands_rejected": float(in_batches(lambda c, m: predictor.answer(c, m).unlike_hands,
                                                        canvases, male).mean())}


def swept(cfg) -> tuple[Path, dict[str, float]]:
    """Run (or resume) the sweep; its exported ensemble, and each trial's best val MAE."""
    outcome = run_sweep(cfg)
    return outcome.bundle, dict(zip(outcome.table["trial"], outcome.table["best_val_mae"]))


def finished_trials_ensemble(cfg, epochs: int) -> tuple[Path, dict[str, float]]:
    """The sweep's finished trials (read from its folder, nothing run) exported as the sweep would export them."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    folder = Path(cfg.train.storage_path) / cfg.tune.sweep_name
    finished = [r for r in ResultGrid(ExperimentAnalysis(folder)) if r.metrics_dataframe is not None
                and "epoch" in r.metrics_dataframe and r.metrics_dataframe["epoch"].max() == epochs]
    bundle = export_best(finished, cfg, plan_run(cfg), cfg.tune.sweep_name)
    return bundle, {Path(r.path).name: float(r.metrics_dataframe["val_mae"].min()) for r in finished}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--data", type=Path, default=THUMBS, help=f"RSNA training folder (default: {THUMBS})")
    parser.add_argument("--finished-trials-only", action="store_true",
                        help="export from the trials that finished, running no others")
    args = parser.parse_args()
    if not (args.data / "boneage-training-dataset.csv").is_file():
        sys.exit(f"no RSNA training labels in {args.data}: pass --data DIR (the Kaggle download's layout)")
    ray.init(num_cpus=2, include_dashboard=True)  # one trial at a time beside Ray Data; the State API for Tune
    cfg = load_config(ROOT / "configs" / "demo.yaml", sweep_settings(args.data, args.trials, args.epochs,
                                                                      args.members, args.image_size))
    prepared = prepare_dataset(cfg)
    started = time.perf_counter()
    bundle, trials = finished_trials_ensemble(cfg, args.epochs) if args.finished_trials_only else swept(cfg)
    seconds = time.perf_counter() - started
    figures = test_figures(bundle, prepared)
    print(f"test MAE: ensemble of {args.members} {figures['ensemble_test_mae_raw']:.2f} months, best member "
          f"{figures['best_member_test_mae']:.2f} ({figures['mae_reduction_vs_best_member']:.1%} lower)")
    write_result("ensemble", {
        "data": f"rsna-thumbs: 10,000 real RSNA training images squashed to 100x100, prepared at {args.image_size} px",
        "sweep": {"trials": len(trials), "trials_planned": args.trials, "epochs_per_trial": args.epochs,
                  "scheduler": "fifo (same budget)", "search_space": SPACE, "seconds_this_run": seconds,
                  "trial_val_mae": trials, "finished_trials_only": args.finished_trials_only},
        "ensemble_size": args.members, "bundle": str(bundle), **figures,
        "target": {"mae_reduction_vs_best_member_min": 0.05}})


if __name__ == "__main__":
    main()
