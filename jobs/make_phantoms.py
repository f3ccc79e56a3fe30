"""Write synthetic hand radiographs ("phantoms") with known bone age, in the Kaggle RSNA layout.

    python jobs/make_phantoms.py --out DIR --n 2000 --seed 0 --size 256
"""

from boneage.cli import parse_job_args, run_job
from boneage.phantoms.generate import generate_phantoms

ALIASES = {"--out": "phantoms.out", "--n": "phantoms.n", "--seed": "phantoms.seed", "--size": "phantoms.size"}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(argv, description=__doc__, default_config=None, areas=["phantoms"], aliases=ALIASES,
                         uses_ray=False)
    print(f"phantoms: {generate_phantoms(cfg)}")


if __name__ == "__main__":
    run_job(main)
