"""Issue 15's last signals as a user meets them: images that are not hand radiographs refused (422 from the API,
rejects from the bulk job), and an ensemble bundle served batched under concurrency, with its members' spread."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import requests

from boneage.client import describe_answer
from boneage.config import load_config
from boneage.inference import BoneAgePredictor
from cases import deploy, direct_service, months_in_process, noise_png, post, serve_settings

ENSEMBLE = ["serve.model_uri=ens:1"]


def test_an_image_that_is_not_a_hand_gets_422_and_a_hand_its_score(ensemble_registry, phantoms):
    with direct_service(ensemble_registry, *ENSEMBLE) as url:
        model = requests.get(f"{url}/v1/model", timeout=10).json()
        assert model["ood"]["available"] and model["ood"]["rejecting"] and model["ood"]["dims"] == 1472
        threshold = model["ood"]["threshold"]
        for route in ("predict", "explain"):  # explain refuses before computing any heat map
            refused = post(url, route, noise_png(), sex="F")
            assert refused.status_code == 422 and refused.json()["error"] == "not_a_hand_radiograph", refused.text
            assert "left hand" in refused.json()["detail"]
        answers = [post(url, "predict", png, sex=sex).json() for png, sex in phantoms]
        accepted = [a for a in answers if "ood_score" in a]
        assert len(accepted) >= 6 and all(a["ood_score"] <= threshold for a in accepted), answers
    with direct_service(ensemble_registry, *ENSEMBLE, "serve.reject_ood=false") as url:
        answer = post(url, "predict", noise_png(), sex="F").json()
        assert answer["ood_score"] > threshold and "bone_age_months" in answer  # answered, with its score


def test_the_model_route_lists_the_members_and_answers_their_spread(ensemble_registry, phantoms):
    with direct_service(ensemble_registry, *ENSEMBLE) as url:
        model = requests.get(f"{url}/v1/model", timeout=10).json()
        assert [m["val_mae"] for m in model["ensemble"]] == [11.0, 12.0, 13.0]
        assert model["metrics"]["val_mae"] == model["trust"]["val_raw"]["overall"]["mae"]  # the ensemble's own
        png, sex = phantoms[0]
        answer = post(url, "predict", png, sex=sex).json()
        assert answer["ensemble_spread_months"] > 0
        described = describe_answer(answer)  # the client's line for people (jobs/query.py)
        assert f"ensemble members' SD {answer['ensemble_spread_months']:.1f}" in described
        assert f"out-of-distribution score {answer['ood_score']:.1f}" in described
        schema = requests.get(f"{url}/openapi.json", timeout=10).json()["components"]["schemas"]["Answer"]
        assert schema["properties"]["ensemble_spread_months"]["description"]
        assert schema["properties"]["ood_score"]["description"]


def test_an_ensemble_is_served_batched_and_right_under_concurrency(serve_port, ensemble_registry, phantoms):
    from ray import serve

    deploy(ensemble_registry, "ensemble", "/ensemble", {"num_replicas": 1, "max_ongoing_requests": 64},
           *ENSEMBLE, "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.05")
    url = f"http://127.0.0.1:{serve_port}/ensemble"
    try:
        local = BoneAgePredictor.from_settings(serve_settings(ensemble_registry, *ENSEMBLE))
        accepted = [(png, sex) for png, sex in phantoms if post(url, "predict", png, sex=sex).status_code == 200]
        expected = [months_in_process(local, png, sex) for png, sex in accepted]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda item: post(url, "predict", item[0], sex=item[1]).json(), accepted * 4))
        assert [a["bone_age_months"] for a in answers] == pytest.approx(expected * 4, abs=0.11)
        assert all(a["ensemble_spread_months"] > 0 for a in answers)
        batches = requests.get(f"{url}/v1/model", timeout=30).json()["serving"]["batches_by_size"]
        assert max(int(size) for size in batches) > 1, batches
    finally:
        serve.delete("ensemble")


def test_the_bulk_job_lists_images_that_are_not_hands_in_its_rejects(ensemble_registry, phantom_dir, tmp_path):
    from boneage.scoring import REJECT_NOT_A_HAND, score, write_predictions

    folder = tmp_path / "images"
    folder.mkdir()
    labels = pd.read_csv(phantom_dir / "boneage-training-dataset.csv").head(8)
    for row in labels.itertuples():
        (folder / f"{row.id}.png").write_bytes(next(phantom_dir.rglob(f"{row.id}.png")).read_bytes())
    (folder / "noise.png").write_bytes(noise_png())
    pd.concat([labels, pd.DataFrame({"id": ["noise"], "boneage": [100], "male": [True]})]).to_csv(
        tmp_path / "labels.csv", index=False)
    settings = load_config(overrides=["predict.bundle=ens:1", f"predict.labels={tmp_path / 'labels.csv'}",
                                      f"predict.images={folder}", "predict.actors=1"]).predict
    scored = score(settings, str(ensemble_registry))
    reasons = dict(zip(scored.rejects["id"].astype(str), scored.rejects["reason"]))
    assert reasons["noise"].startswith(f"{REJECT_NOT_A_HAND}: out-of-distribution score")
    assert len(scored.predictions) >= 6 and (scored.predictions["ood_score"] <= scored.ood_threshold).all()
    out, _ = write_predictions(scored, tmp_path / "predictions.csv")
    columns = pd.read_csv(out).columns
    assert {"ood_score", "ensemble_spread_months"} <= set(columns)
