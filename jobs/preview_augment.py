"""Write a PNG grid of augmented training images, to check the augmentation settings by eye.

    python jobs/preview_augment.py --config configs/demo.yaml [--set augment.zoom_range=0.2] [--out PNG]

It writes outputs/augment-preview.png (augment.preview_path) unless --out names another file. The first row shows
training images from the prepared dataset (data.out) as they are; each row below, one random augmentation of each.
"""

from boneage.cli import parse_job_args, run_job
from boneage.augment import preview_augmentations


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_args(argv, description=__doc__, default_config="configs/train.yaml", areas=["data", "augment"],
                         aliases={"--out": "augment.preview_path"}, uses_ray=True)
    print(f"preview: {preview_augmentations(cfg)}")


if __name__ == "__main__":
    run_job(main)
