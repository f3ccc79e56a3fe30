"""Train the VGG16 bone-age regressor with Ray Train on a prepared dataset (see boneage.train).

    python jobs/train.py --config configs/train.yaml [--set train.epochs=3 ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/train.yaml

The last line names the registered model bundle: `bundle: <path>`.
"""

from boneage.cli import parse_job_args, run_job

AREAS = ["data", "model", "augment", "train", "registry"]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(argv, description=__doc__, default_config="configs/train.yaml", areas=AREAS, uses_ray=True)
    from boneage.train import run_training  # after the first line: torch and Ray Train load slowly

    outcome = run_training(cfg)
    best = outcome.metrics
    print(f"best epoch {best['epoch']}: val MAE {best['val_mae']:.2f} months, val RMSE {best['val_rmse']:.2f} "
          f"(predict-the-mean baseline: {outcome.baseline_mae:.2f} months)")
    print(f"run: {outcome.run_path}")
    print(f"bundle: {outcome.bundle}")


if __name__ == "__main__":
    run_job(main)
