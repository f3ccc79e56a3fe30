"""Export registered bundles as ONE ensemble bundle that answers their mean (see boneage.ensemble).

    python jobs/ensemble.py --config configs/ensemble.yaml --set "ensemble.members=[boneage-vgg16:3, boneage-vgg16:5]"
    ray job submit --working-dir . -- python jobs/ensemble.py --config configs/ensemble.yaml --set ...

The members (best first) must be trained on the same prepared data. The ensemble's bias correction, intervals and
out-of-distribution detector are fitted on their validation split, its val MAE measured there, and it becomes
`<registry.name>:best` if it beats the current best. The last line names it: `ensemble: <path>`.
(`jobs/tune.py --set tune.ensemble_size=3` exports a sweep's best trials the same way.)
"""

from boneage.cli import parse_job_args, run_job

AREAS = ["ensemble", "registry"]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(argv, description=__doc__, default_config="configs/ensemble.yaml", areas=AREAS,
                         uses_ray=False)
    from boneage.ensemble import run_ensemble  # after the first line: torch loads slowly

    outcome = run_ensemble(cfg)
    members = ", ".join(f"{mae:.2f}" for mae in outcome.member_val_mae)
    print(f"ensemble of {len(outcome.member_val_mae)}: val MAE {outcome.val_mae:.2f} months (members: {members})")
    print(outcome.promotion.message)
    print(f"ensemble: {outcome.bundle}")


if __name__ == "__main__":
    run_job(main)
