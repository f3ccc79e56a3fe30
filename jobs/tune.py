"""Sweep the training job's settings with Ray Tune and ASHA, then promote the best model if it is better.

    python jobs/tune.py --config configs/tune.yaml [--set tune.num_samples=16 ...]
    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune.yaml

Rerunning the same command after an interruption resumes the sweep. The last lines name the leaderboard as
`leaderboard: <path>` and the promoted bundle, if any, as `best: <path>`.
"""

from boneage.cli import parse_job_args, run_job

AREAS = ["data", "model", "augment", "train", "tune", "registry"]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(argv, description=__doc__, default_config="configs/tune.yaml", areas=AREAS, uses_ray=True)
    from boneage.tune import run_sweep  # after the first line: torch and Ray Train load slowly

    outcome = run_sweep(cfg)
    print(outcome.table.drop(columns="error").to_string(index=False))
    print(outcome.promotion)
    print(f"leaderboard: {outcome.leaderboard}")
    if outcome.promoted:
        print(f"best: {outcome.bundle}")


if __name__ == "__main__":
    run_job(main)
