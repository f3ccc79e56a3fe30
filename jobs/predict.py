"""Score many radiographs with a model bundle: Ray Data bulk inference (see boneage.scoring).

    python jobs/predict.py --config configs/predict.yaml --set predict.bundle=boneage-vgg16:best \
        predict.labels=<labels.csv> predict.images=<folder> predict.out=<predictions.csv>
    python jobs/predict.py --config configs/predict.yaml --set predict.data=<prepared folder> predict.split=test

Writes `id, sex, bone_age_months` (and `boneage`, the true age, when known) and, beside it, every image left out
with its reason (`<stem>.rejects.csv`). The last line names the predictions: `predictions: <path>`.
"""

from boneage.cli import parse_job_args, run_job

AREAS = ["predict", "registry"]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(argv, description=__doc__, default_config="configs/predict.yaml", areas=AREAS,
                         uses_ray=True)
    from boneage.rsna import reject_counts
    from boneage.scoring import score, write_predictions  # after the first line: torch loads slowly

    scored = score(cfg.predict, cfg.registry.root)
    predictions, rejects = write_predictions(scored, cfg.predict.out)
    known = int(scored.predictions["boneage"].notna().sum())
    print(f"scored {len(scored.predictions)} images ({known} with a true age) with {scored.bundle_path}")
    print(scored.describe_answers())
    print(f"rejected {len(scored.rejects)}: {reject_counts(scored.rejects) or 'none'} (every one with its reason: "
          f"{rejects})")
    print(f"predictions: {predictions}")


if __name__ == "__main__":
    run_job(main)
