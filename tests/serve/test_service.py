"""The Ray Serve application over real HTTP: routes, batching, no cross-talk under concurrency, overload, bundle
swaps, bad bundles, autoscaling and the real full-size radiographs."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import yaml
from ray import serve
from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

from boneage.bundle import BundleError
from boneage.config import ConfigError
from boneage.service import build
from cases import (APP, SHIPPED, bad_requests, deploy, deploy_session_app, months_in_process, post, serve_deploy,
                   shipped_config)
from helpers import ROOT, make_bundle, wait_until

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


def test_concurrent_requests_give_the_sequential_answers_and_heat_maps_and_form_batches(service_url, phantoms):
    def ask(item):
        (png, sex), route = item
        response = post(service_url, route, png, sex=sex)
        assert response.status_code == 200, response.text
        return response.json()["bone_age_months"], response.json().get("heatmap")  # the heat map grid on /v1/explain only

    work = [(p, route) for p in phantoms for route in ("predict", "explain")]
    sequential = [ask(item) for item in work]
    with ThreadPoolExecutor(len(work)) as pool:
        concurrent = list(pool.map(ask, work * 2))
    assert [age for age, _ in concurrent] == pytest.approx([age for age, _ in sequential] * 2, abs=0.11)  # 0.1 month
    for (_, heatmap), (_, expected), item in zip(concurrent, sequential * 2, work * 2):
        if expected is not None:  # the lock keeps concurrent Grad-CAMs from mixing activations, gradients or sex
            np.testing.assert_allclose(heatmap, expected, atol=2e-3, err_msg=f"heat map of {item[1]}")
    assert len({age for age, _ in sequential[::2]}) > 1  # the images really differ, so a mix-up would show
    assert len({str(heatmap) for _, heatmap in sequential[1::2]}) == len(phantoms)  # and so do their heat maps
    batches = requests.get(f"{service_url}/v1/model", timeout=30).json()["serving"]["batches_by_size"]
    assert max(int(size) for size in batches) > 1, batches


def test_a_new_bundle_version_is_swapped_in_without_restarting_ray(service_url, registry, phantoms):
    png, sex = phantoms[1]
    before = post(service_url, "predict", png, sex=sex).json()
    try:
        deploy(registry, APP, "/", {"num_replicas": 1}, "serve.model_uri=tiny:2")
        after = post(service_url, "predict", png, sex=sex).json()
    finally:
        deploy_session_app(registry)  # the other tests' application, as the session fixture deployed it
    assert before["model"]["version"] == "1" and after["model"]["version"] == "2"
    assert after["bone_age_months"] != before["bone_age_months"]


def test_a_tampered_bundle_stops_its_deployment_through_serve_and_the_other_apps_keep_serving(
        ray_session, service_url, serve_port, phantoms, tmp_path):
    bundle, _ = make_bundle(tmp_path / "b", seed=3)
    (bundle / "model.pt").write_bytes((bundle / "model.pt").read_bytes()[:-10] + b"0123456789")
    config = shipped_config(serve_port, "tampered", model_uri=str(bundle), overlay_size=128)
    done = serve_deploy(config, tmp_path, ray_session.test_dashboard_url)
    assert done.returncode == 0, done.stderr  # the CLI only hands the file over; Serve builds the application
    try:
        wait_until(lambda: app_status("tampered") not in ("NOT_STARTED", "DEPLOYING"), "Serve to build 'tampered'",
                   interval=1)
        found = serve.status().applications["tampered"]
        assert found.status == "DEPLOY_FAILED" and "does not match the checksum" in found.message, found.message
        assert not any(d.replica_states for d in found.deployments.values()), found.deployments  # no replica
        png, sex = phantoms[0]
        assert post(service_url, "predict", png, sex=sex).status_code == 200  # the session's application serves
    finally:
        serve.delete("tampered")


def test_a_missing_bundle_or_an_unknown_setting_stops_the_build_with_a_clear_error(registry):
    with pytest.raises(BundleError, match="no version '7'"):
        build({"model_uri": "tiny:7", "registry_root": str(registry)})
    with pytest.raises(ConfigError, match="unknown key serve.batch_size; valid keys in serve: calibrate, interval_level, tta, reject_ood, model_uri"):
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

        def loaded_to_two_replicas() -> bool:
            list(pool.map(lambda _: post(url, "explain", png, sex=sex), range(12)))
            return replicas("scaling") == 2

        with ThreadPoolExecutor(6) as pool:
            wait_until(loaded_to_two_replicas, "load to bring a second replica", timeout=120, interval=0)
        wait_until(lambda: replicas("scaling") == 1, "the idle deployment to drop its extra replica", timeout=120,
                   interval=1)
    finally:
        serve.delete("scaling")


@pytest.mark.real_data
def test_serves_the_real_full_size_radiographs(service_url, fullsize, local_predictor):
    images = sorted(fullsize.rglob("*.png"))[:6]
    assert images
    for path in images:
        response = post(service_url, "explain", path.read_bytes(), path.name, sex="M", chronological_age_months="120")
        assert response.status_code == 200, (path, response.text)
        expected = months_in_process(local_predictor, path.read_bytes(), "M")  # the same model in this process
        assert response.json()["bone_age_months"] == pytest.approx(expected, abs=0.06), path


def test_the_query_job_prints_the_answer_and_writes_the_overlay(service_url, phantoms, tmp_path):
    image, overlay = tmp_path / "hand.png", tmp_path / "out" / "overlay.png"
    image.write_bytes(phantoms[0][0])
    done = subprocess.run([sys.executable, "jobs/query.py", "--url", service_url, "--file", str(image), "--sex", "F",
                           "--age", "120", "--overlay", str(overlay)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.match(r"bone age \d+\.\d months \(.+\)(, 90% interval \d+\.\d-\d+\.\d| \(not bias-corrected\)), sex F "
                    r"\(from the form\); chronological age 120 months: SDS [+-]\d\.\d\d, "
                    r"(delayed|normal|advanced|indeterminate); model tiny version \d", done.stdout), done.stdout
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"overlay: {overlay}" in done.stdout
    refused = subprocess.run([sys.executable, "jobs/query.py", "--url", service_url, "--file", str(image)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: the service answered 422 missing_sex: give 'sex' as M or F")


def test_configs_serve_yaml_deploys_with_the_serve_cli_and_its_shipped_settings_take_effect(
        ray_session, serve_port, registry, tmp_path):
    """`serve deploy configs/serve.yaml` as the README says (only the model, port, route and CPUs changed for the
    test): Serve runs the application with the file's back-pressure, autoscaling, timeout and loopback bind."""
    shipped = yaml.safe_load(SHIPPED.read_text())
    assert shipped["http_options"]["host"] == "127.0.0.1" and shipped["http_options"]["request_timeout_s"] == 60
    config = shipped_config(serve_port, "fromfile", model_uri="tiny:2", registry_root=str(registry),
                            overlay_size=128)
    done = serve_deploy(config, tmp_path, ray_session.test_dashboard_url)
    assert done.returncode == 0, done.stderr
    try:
        wait_until(lambda: app_status("fromfile") not in ("NOT_STARTED", "DEPLOYING"), "Serve to deploy 'fromfile'",
                   interval=1)
        assert app_status("fromfile") == "RUNNING", serve.status().applications["fromfile"].message
        model = requests.get(f"http://127.0.0.1:{serve_port}/fromfile/v1/model", timeout=30).json()
        assert model["model"] == {"name": "tiny", "version": "2"}
        assert model["serving"]["max_batch_size"] == shipped["applications"][0]["args"]["max_batch_size"] == 16
        details = ServeSubmissionClient(ray_session.test_dashboard_url).get_serve_details()  # as `serve status`
        assert_runs_with_the_shipped_settings(details, shipped, serve_port)
    finally:
        serve.delete("fromfile")


def assert_runs_with_the_shipped_settings(details: dict, shipped: dict, port: int) -> None:
    """What Serve reports it runs (its REST API's deployment config and HTTP options) is what the file ships, and
    the HTTP proxy listens on loopback only."""
    deployed = details["applications"]["fromfile"]["deployments"]["BoneAgeService"]["deployment_config"]
    wanted = shipped["applications"][0]["deployments"][0]
    assert deployed["max_ongoing_requests"] == wanted["max_ongoing_requests"] == 32
    assert deployed["max_queued_requests"] == wanted["max_queued_requests"] == 32
    assert wanted["autoscaling_config"] == {key: deployed["autoscaling_config"][key]
                                            for key in wanted["autoscaling_config"]}
    assert (wanted["autoscaling_config"]["min_replicas"], wanted["autoscaling_config"]["max_replicas"],
            wanted["autoscaling_config"]["target_ongoing_requests"]) == (1, 2, 8)  # the README's table
    http = details["http_options"]
    assert (http["host"], http["request_timeout_s"]) == (shipped["http_options"]["host"], 60)
    node_ip = ray_node_ip()
    if node_ip != "127.0.0.1":  # bound to loopback only: the node's other address refuses the connection
        with pytest.raises(OSError):
            socket.create_connection((node_ip, port), timeout=5).close()


def ray_node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def test_the_readme_metrics_reach_rays_prometheus_export(ray_session, service_url, phantoms):
    """Every metric the README lists, in Ray's metrics export (Prometheus text on the node's metrics port), after a
    prediction, an explanation and a refused request."""
    listed = re.findall(r"`(boneage_\w+)`", README_METRICS.search((ROOT / "README.md").read_text()).group(0))
    assert len(listed) == 6, listed
    png, sex = phantoms[0]
    assert post(service_url, "predict", png, sex=sex).status_code == 200
    assert post(service_url, "explain", png, sex=sex).status_code == 200
    assert post(service_url, "predict", png).json()["error"] == "missing_sex"
    port = next(node["MetricsExportPort"] for node in ray_session.nodes() if node["Alive"])

    def exported() -> dict[str, list[str]] | None:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = {name: re.findall(rf"^ray_{name}(?:_total|_count)?{{(.*)}} ", text, re.M) for name in listed}
        done = all(found.values()) and any('reason="missing_sex"' in tags for tags in found["boneage_rejections"])
        return found if done else None

    found = wait_until(exported, f"{listed} in Ray's metrics export", timeout=120, interval=2)
    assert any('route="/v1/predict"' in tags and 'status="200"' in tags for tags in found["boneage_requests"])
    assert any('route="/v1/explain"' in tags for tags in found["boneage_request_seconds"])


README_METRICS = re.compile(r"Metrics go through Ray's metrics export.*?\n\n", re.S)
