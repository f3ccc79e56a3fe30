"""The Ray Serve application over real HTTP: routes, batching, no cross-talk under concurrency, overload, bundle
swaps, bad bundles, autoscaling and the real full-size radiographs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from ray import serve

from boneage.bundle import BundleError
from boneage.config import ConfigError
from boneage.service import build
from cases import APP, bad_requests, deploy, post
from helpers import ROOT, make_bundle

def test_routes_answer_through_serve(service_url, phantoms):
    png, sex = phantoms[0]
    assert post(service_url, "predict", png, sex=sex).json()["model"] == {"name": "tiny", "version": "1"}
    assert "overlay_png_base64" in post(service_url, "explain", png, sex=sex).json()
    model = requests.get(f"{service_url}/v1/model", timeout=30).json()
    assert model["serving"]["backend"] == "ray-serve" and model["serving"]["max_batch_size"] == 16  # the default
    assert model["serving"]["batch_wait_timeout_s"] == 0.05  # the deployment's override reached the replica
    assert requests.get(f"{service_url}/healthz", timeout=30).json()["status"] == "ok"
    assert 'id="query"' in requests.get(service_url, timeout=30).text


def test_bad_inputs_answer_4xx_json_through_serve(service_url, phantoms, tmp_path):
    png, _ = phantoms[0]
    for case, kwargs, status, code in bad_requests(tmp_path, png):
        if case == "body over the size limit":
            continue  # the test deployment's limit is the default 32 MB; the plain-server test covers it
        response = requests.post(f"{service_url}/v1/predict", timeout=60, **kwargs)
        assert (response.status_code, response.json()["error"]) == (status, code), case
        assert post(service_url, "predict", png, sex="F").status_code == 200, f"after {case}"


def test_concurrent_requests_give_the_sequential_answers_and_form_batches(service_url, phantoms):
    def ask(item):
        (png, sex), route = item
        return post(service_url, route, png, sex=sex).json()["bone_age_months"]

    work = [(p, route) for p in phantoms for route in ("predict", "explain")]
    sequential = [ask(item) for item in work]
    with ThreadPoolExecutor(len(work)) as pool:
        concurrent = list(pool.map(ask, work * 2))
    assert concurrent == pytest.approx(sequential * 2, abs=0.11)  # rounding to 0.1 month
    assert len(set(sequential[::2])) > 1  # the images really differ, so a mix-up would show
    batches = requests.get(f"{service_url}/v1/model", timeout=30).json()["serving"]["batches_by_size"]
    assert max(int(size) for size in batches) > 1, batches


def test_a_new_bundle_version_is_swapped_in_without_restarting_ray(service_url, registry, phantoms):
    png, sex = phantoms[1]
    before = post(service_url, "predict", png, sex=sex).json()
    deploy(registry, APP, "/", {"num_replicas": 1}, "serve.model_uri=tiny:2")
    after = post(service_url, "predict", png, sex=sex).json()
    assert before["model"]["version"] == "1" and after["model"]["version"] == "2"
    assert after["bone_age_months"] != before["bone_age_months"]


def test_a_tampered_or_missing_bundle_stops_the_deployment_with_a_clear_error(registry, tmp_path):
    bundle, _ = make_bundle(tmp_path / "b", seed=3)
    (bundle / "model.pt").write_bytes((bundle / "model.pt").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError, match="does not match the checksum"):
        build({"model_uri": str(bundle)})
    with pytest.raises(BundleError, match="no version '7'"):
        build({"model_uri": "tiny:7", "registry_root": str(registry)})
    with pytest.raises(ConfigError, match="unknown key serve.batch_size; valid keys in serve: model_uri"):
        build({"model_uri": "tiny:1", "batch_size": 4})


def test_overload_answers_503_quickly_and_the_service_recovers(serve_port, registry, phantoms):
    deploy(registry, "tight", "/tight", {"num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1})
    url = f"http://127.0.0.1:{serve_port}/tight"
    png, sex = phantoms[0]

    def timed(_):
        started = time.perf_counter()
        status = post(url, "explain", png, sex=sex).status_code
        return status, time.perf_counter() - started

    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(timed, range(12)))
        refused = [seconds for status, seconds in results if status == 503]
        assert refused and {status for status, _ in results} <= {200, 503}, results
        assert max(refused) < 5.0, results  # refused at once, not after a timeout
        assert post(url, "predict", png, sex=sex).status_code == 200
    finally:
        serve.delete("tight")


def app_status(app: str) -> str:
    found = serve.status().applications.get(app)
    return found.status if found else "NOT_STARTED"


def replicas(app: str) -> int:
    states = serve.status().applications[app].deployments["BoneAgeService"].replica_states
    return states.get("RUNNING", 0)


@pytest.mark.slow
def test_replicas_scale_up_under_load_and_back_down(serve_port, registry, phantoms):
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
               "downscale_delay_s": 3}
    deploy(registry, "scaling", "/scaling", {"autoscaling_config": scaling, "max_ongoing_requests": 4})
    url = f"http://127.0.0.1:{serve_port}/scaling"
    png, sex = phantoms[0]
    try:
        assert replicas("scaling") == 1
        peak, deadline = 1, time.time() + 120
        with ThreadPoolExecutor(6) as pool:
            while peak < 2 and time.time() < deadline:
                list(pool.map(lambda _: post(url, "explain", png, sex=sex), range(12)))
                peak = max(peak, replicas("scaling"))
        assert peak == 2, "load never brought a second replica"
        deadline = time.time() + 120
        while replicas("scaling") > 1 and time.time() < deadline:
            time.sleep(1)
        assert replicas("scaling") == 1, "the idle deployment kept its extra replica"
    finally:
        serve.delete("scaling")


@pytest.mark.real_data
def test_serves_the_real_full_size_radiographs(service_url, fullsize):
    images = sorted(fullsize.rglob("*.png"))[:6]
    assert images
    for path in images:
        response = post(service_url, "explain", path.read_bytes(), path.name, sex="M", chronological_age_months="120")
        assert response.status_code == 200, (path, response.text)
        assert 0 < response.json()["bone_age_months"] < 1000


def test_the_query_job_prints_the_answer_and_writes_the_overlay(service_url, phantoms, tmp_path):
    image, overlay = tmp_path / "hand.png", tmp_path / "out" / "overlay.png"
    image.write_bytes(phantoms[0][0])
    done = subprocess.run([sys.executable, "jobs/query.py", "--url", service_url, "--file", str(image), "--sex", "F",
                           "--age", "120", "--overlay", str(overlay)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.match(r"bone age \d+\.\d months \(.+\), sex F \(from the form\); chronological age 120 months: SDS "
                    r"[+-]\d\.\d\d, (delayed|normal|advanced); model tiny version \d", done.stdout)
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"overlay: {overlay}" in done.stdout
    refused = subprocess.run([sys.executable, "jobs/query.py", "--url", service_url, "--file", str(image)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: the service answered 422 missing_sex: give 'sex' as M or F")


def test_configs_serve_yaml_deploys_with_the_serve_cli(ray_session, serve_port, registry, tmp_path):
    """`serve deploy configs/serve.yaml` as the README says (only the model, port and route changed for the test)."""
    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    config["http_options"]["port"] = serve_port
    app = config["applications"][0]
    app.update(name="fromfile", route_prefix="/fromfile")
    app["args"].update(model_uri="tiny:2", registry_root=str(registry), overlay_size=128)
    app["deployments"][0]["ray_actor_options"]["num_cpus"] = 0.25
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    done = subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy", str(path), "--address",
                           ray_session.test_dashboard_url], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    try:
        deadline = time.time() + 180
        while app_status("fromfile") in ("NOT_STARTED", "DEPLOYING") and time.time() < deadline:
            time.sleep(1)
        assert app_status("fromfile") == "RUNNING", serve.status().applications["fromfile"].message
        model = requests.get(f"http://127.0.0.1:{serve_port}/fromfile/v1/model", timeout=30).json()
        assert model["model"] == {"name": "tiny", "version": "2"}
        assert model["serving"]["max_batch_size"] == app["args"]["max_batch_size"]  # the file's settings applied
    finally:
        serve.delete("fromfile")
