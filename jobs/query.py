"""Ask a running bone-age service about one radiograph and print its answer (see boneage.client).

    python jobs/query.py --file hand.png --sex F --age 120 [--overlay outputs/overlay.png]
    python jobs/query.py --set query.url=http://127.0.0.1:8000 query.file=hand.dcm

With an overlay path, it asks /v1/explain and writes the Grad-CAM overlay PNG there.
"""

from boneage.cli import parse_job_args, run_job
from boneage.client import describe_answer, query_service

ALIASES = {"--url": "query.url", "--file": "query.file", "--sex": "query.sex",
           "--age": "query.chronological_age_months", "--overlay": "query.overlay_out"}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(argv, description=__doc__, default_config=None, areas=["query"], aliases=ALIASES,
                         uses_ray=False)
    answer = query_service(cfg.query)
    print(describe_answer(answer))
    if cfg.query.overlay_out:
        print(f"overlay: {cfg.query.overlay_out}")


if __name__ == "__main__":
    run_job(main)
