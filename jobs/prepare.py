"""Prepare a bone-age dataset: labels + images -> split, decoded, resized Parquet (see boneage.prepare).

    python jobs/prepare.py --config configs/data.yaml --set data.image_size=256
"""

from boneage.cli import parse_job_args, run_job
from boneage.prepare import prepare_dataset


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(argv, description=__doc__, default_config="configs/data.yaml", areas=["data"], uses_ray=True)
    print(f"prepared: {prepare_dataset(cfg)}")


if __name__ == "__main__":
    run_job(main)
