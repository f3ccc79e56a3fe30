"""How good the real-data model is: the evaluate job on the RSNA thumbnails' test split and on the 32 full-size
radiographs, with the same bundle.

    python bench/rsna_thumbs_evaluation.py [--bundle FOLDER]

The bundle defaults to the one bench/rsna_thumbs_training.py trained (its results file names it); its prepared
folder gives the test split. The full-size radiographs (../shared/data/rsna-fullsize) keep their aspect ratio and
were registered by a third party, where the thumbnails squash each original to 100x100: the model meets another
framing there, and the figures say how much that costs. All 32 are also among the 10,000 thumbnails (in their
train, val and test splits): the result says how many of each. Results: bench/results/rsna_thumbs_evaluation.json
and the scatter of the test split, bench/results/rsna_thumbs_scatter.png (the README shows it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from boneage.bundle import BundleMeta  # noqa: E402
from boneage.config import load_config  # noqa: E402
from boneage.dataset import split_names, split_path  # noqa: E402
from boneage.evaluate import run_evaluation  # noqa: E402
from boneage.metrics import EvaluationMetrics  # noqa: E402
from boneage.report import scatter_png  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FULLSIZE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-fullsize"


def evaluate(bundle: Path, out: Path, *where: str) -> EvaluationMetrics:
    """The evaluate job's library call on one set; its metrics."""
    cfg = load_config("configs/evaluate.yaml", [f"eval.bundle={bundle}", f"eval.out={out}", "eval.data=", *where])
    return run_evaluation(cfg).metrics


def headline(metrics: EvaluationMetrics) -> dict:
    """The figures the README table shows."""
    model = metrics.overall.model
    return {"images": model.count, "mae": model.mae, "mae_ci": [metrics.mae_ci.low, metrics.mae_ci.high],
            "rmse": model.rmse, "median_ae": model.median_ae, "within_12": model.within_12, "bias": model.bias,
            "baseline_mae": metrics.overall.baseline.mae,
            "mae_by_sex": {sex: group.model.mae for sex, group in metrics.by_sex.items()},
            "mae_by_age_band": {band: group.model.mae for band, group in metrics.by_age_band.items()}}


def splits_holding(prepared: Path, ids: set[str]) -> dict[str, int]:
    """How many of ``ids`` each split of the prepared folder holds."""
    return {split: len(ids & set(pq.read_table(split_path(prepared, split), columns=["id"])["id"].to_pylist()))
            for split in split_names(prepared)}


def main() -> None:
    trained = json.loads((RESULTS / "rsna_thumbs_training.json").read_text())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path(trained["bundle"]))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/rsna-thumbs"))
    args = parser.parse_args()
    prepared = Path(BundleMeta.load(args.bundle).data.prepared)
    ray.init(num_cpus=4, include_dashboard=False)
    test = evaluate(args.bundle, args.out / "eval-test", f"eval.data={prepared}", "eval.split=test")
    full = evaluate(args.bundle, args.out / "eval-fullsize", f"eval.labels={FULLSIZE / 'train.csv'}",
                    f"eval.images={FULLSIZE}")
    predictions = pd.read_csv(args.out / "eval-test" / "predictions.csv")
    (RESULTS / "rsna_thumbs_scatter.png").write_bytes(scatter_png(predictions))
    full_ids = set(pd.read_csv(FULLSIZE / "train.csv", dtype=str)["id"])
    write_result("rsna_thumbs_evaluation", {
        "bundle": str(args.bundle), "trained": {k: trained[k] for k in ("image_size", "epochs", "model")},
        "thumbs_test_split": headline(test), "fullsize": headline(full),
        "fullsize_ids_in_thumbs_splits": splits_holding(prepared, full_ids),
        "reports": [str(args.out / "eval-test" / "report.html"), str(args.out / "eval-fullsize" / "report.html")]})
    print(f"thumbnails test MAE {test.mae:.2f} (baseline {test.overall.baseline.mae:.2f}); full-size "
          f"MAE {full.mae:.2f} (baseline {full.overall.baseline.mae:.2f})")


if __name__ == "__main__":
    main()
