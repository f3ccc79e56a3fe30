"""Score a labelled set with a model bundle and write metrics.json and a self-contained report.html (see
boneage.evaluate).

    python jobs/evaluate.py --config configs/evaluate.yaml --set eval.bundle=<ref> eval.labels=<file> \
        eval.images=<folder> eval.out=<folder>
    python jobs/evaluate.py --config configs/evaluate.yaml --set eval.data=<prepared folder> eval.split=test
    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/evaluate.yaml --set ...

The last line names the report: `report: <path>`.
"""

from boneage.cli import parse_job_args, run_job

AREAS = ["eval", "registry"]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(argv, description=__doc__, default_config="configs/evaluate.yaml", areas=AREAS,
                         uses_ray=True)
    from boneage.evaluate import run_evaluation  # after the first line: torch and Ray load slowly

    outcome = run_evaluation(cfg)
    metrics = outcome.metrics
    print(f"MAE {metrics.mae:.2f} months (95% CI {metrics.mae_ci.low:.2f}-{metrics.mae_ci.high:.2f}) on "
          f"{metrics.overall.model.count} images; predict-the-training-mean baseline "
          f"{metrics.overall.baseline.mae:.2f} months")
    print(f"metrics: {outcome.metrics_path}")
    print(f"report: {outcome.report}")


if __name__ == "__main__":
    run_job(main)
