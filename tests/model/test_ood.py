"""Out-of-distribution rejection (issue 15, section 3): the detector's fit, threshold and file, and the corpus."""

import io

import numpy as np
import pytest
from PIL import Image

from boneage.imaging import load_radiograph
from boneage.ood import OOD_FILE, OodDetector, OodFileError, pooled_features
from boneage.phantoms.generate import make_phantom
from boneage.phantoms.nonhands import ood_corpus
from helpers import make_bundle

SIZE = 32


def gaussian_features(rng, count: int, dims: int = 4) -> np.ndarray:
    """Features with known mean (1, 2, ...) and SDs (1, 2, ...), independent: distances are known."""
    return rng.normal(np.arange(1.0, dims + 1), np.arange(1.0, dims + 1), size=(count, dims))


def test_scores_are_mahalanobis_distances_and_the_threshold_rejects_one_percent_of_val():
    rng = np.random.default_rng(0)
    detector = OodDetector.fit(gaussian_features(rng, 20000), gaussian_features(rng, 5000))
    # 3 SDs along one axis is distance 3 whatever the axis's scale; the mean is distance 0
    points = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 16.0]])
    assert detector.scores(points) == pytest.approx([0.0, 3.0, 3.0], abs=0.1)
    # the 99th percentile of a chi distribution with 4 degrees of freedom is 3.64
    assert detector.threshold == pytest.approx(3.64, abs=0.1)
    assert detector.val_rejection <= 0.01
    assert detector.rejects(gaussian_features(rng, 20000)).mean() == pytest.approx(0.01, abs=0.003)
    assert detector.rejects(points).tolist() == [False, False, False]
    assert detector.rejects(np.array([[1.0, 2.0, 3.0, 24.0]])).tolist() == [True]  # 5 SDs out


def test_the_detector_file_round_trips_and_a_pickled_object_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    detector = OodDetector.fit(gaussian_features(rng, 500), gaussian_features(rng, 200), max_hand_rejection=0.02)
    path = detector.save(tmp_path)
    assert path == tmp_path / OOD_FILE and [p.name for p in tmp_path.iterdir()] == [OOD_FILE]
    loaded = OodDetector.load(tmp_path)
    features = gaussian_features(rng, 50)
    assert loaded.scores(features) == pytest.approx(detector.scores(features))
    assert loaded.summary() == detector.summary() and loaded.summary()["max_hand_rejection"] == 0.02
    arrays = dict(np.load(path, allow_pickle=False))
    np.savez(path, **{**arrays, "stages": np.array([{"evil": "object"}], dtype=object)})
    with pytest.raises(OodFileError, match="not a readable"):
        OodDetector.load(tmp_path)
    np.savez(path, **{**arrays, "scale": arrays["scale"][:2]})
    with pytest.raises(OodFileError, match="damaged"):
        OodDetector.load(tmp_path)


def phantom_canvases(start: int, count: int) -> np.ndarray:
    """Phantom hands framed like uploads, at the tiny model's size."""
    def png(image):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    return np.stack([load_radiograph(png(make_phantom(i, 7, 128, 0.0).image), SIZE) for i in range(start, start + count)])


def test_the_corpus_is_rejected_and_phantom_hands_left_and_right_are_accepted(tmp_path):
    _, net = make_bundle(tmp_path / "bundle", size=SIZE)  # its features, untrained, already tell hands apart
    hands = phantom_canvases(0, 120)
    male = np.arange(len(hands)) % 2 == 0
    detector = OodDetector.fit_on_images(lambda canvases, sexes: pooled_features(net, canvases, sexes),
                                         (hands[:80], male[:80]), (hands[80:110], male[80:110]), mirrored=True)
    unseen = pooled_features(net, hands[110:], male[110:])
    assert detector.rejects(unseen).mean() <= 0.1
    corpus = ood_corpus(SIZE, seed=0, per_kind=4)
    assert set(corpus) == {"blank", "uniform_noise", "gaussian_noise", "text", "photograph", "chest",
                           "inverted_hand", "mirrored_hand"}
    assert all(images.shape[1:] == (SIZE, SIZE) and images.dtype == np.uint8 for images in corpus.values())
    rejected = {kind: detector.rejects(pooled_features(net, images, np.zeros(len(images), bool))).mean()
                for kind, images in corpus.items()}
    assert rejected.pop("mirrored_hand") <= 0.25  # a right hand: the fit saw mirrored training hands
    assert all(share >= 0.75 for share in rejected.values()), rejected
