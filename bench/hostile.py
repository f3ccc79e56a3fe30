"""Issue 16: the table of hostile files and what each reader answers them, recorded.

    python bench/hostile.py

Every case of :func:`boneage.phantoms.hostile.hostile_files` goes through the prepare job (its rejects file: the
reason code) and through the API on the plain server (status and error code), beside a valid phantom that must
still be answered 200 after all of them. Results: bench/results/hostile.json; a mismatch with a case's expected
code is listed there and printed. (The tests check the same, and the request-level cases too:
tests/data/test_hostile_files.py, tests/serve/test_hostile_requests.py.)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pandas as pd
import ray
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_like_bundle, write_result  # noqa: E402
from serve_latency import phantom_png  # noqa: E402

from boneage.api import REJECTED_STATUS, direct_server, serving_in_thread  # noqa: E402
from boneage.config import load_config  # noqa: E402
from boneage.dataset import REJECTS  # noqa: E402
from boneage.imaging import REJECT_UNDECODABLE  # noqa: E402
from boneage.phantoms.generate import generate_phantoms  # noqa: E402
from boneage.phantoms.hostile import EMPTY_FILE, HostileFile, hostile_files  # noqa: E402
from boneage.prepare import prepare_dataset  # noqa: E402


def prepare_codes(cases: list[HostileFile], work: Path) -> dict[str, str]:
    """Each case's reason code in the prepare job's rejects file (beside 40 phantoms that are prepared)."""
    source = work / "source"
    generate_phantoms(load_config(overrides=[f"phantoms.out={source}", "phantoms.n=40", "phantoms.size=64",
                                             "phantoms.workers=1"]))
    labels = source / "boneage-training-dataset.csv"
    rows = []
    for index, case in enumerate(cases):
        (source / f"9{index:03d}{Path(case.name).suffix}").write_bytes(case.data)
        rows.append({"id": f"9{index:03d}", "boneage": "120", "male": "True"})
    pd.concat([pd.read_csv(labels, dtype=str), pd.DataFrame(rows)]).to_csv(labels, index=False)
    out = work / "prepared"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        prepare_dataset(load_config(overrides=[f"data.labels={labels}", f"data.images={source}", f"data.out={out}",
                                               "data.image_size=32", "data.max_reject_fraction=0.7"]))
    finally:
        ray.shutdown()
    rejects = pd.read_csv(out / REJECTS, dtype=str, keep_default_na=False)
    codes = dict(zip(rejects["id"], rejects["reason"].str.split(":").str[0]))
    return {case.name: codes.get(f"9{index:03d}", "accepted") for index, case in enumerate(cases)}


def api_answers(cases: list[HostileFile], work: Path) -> tuple[dict[str, tuple[int, str]], int]:
    """Each case's (status, error code) from the API on the plain server; then a valid phantom's status."""
    bundle = demo_like_bundle(work / "bundle", 64)
    settings = load_config(overrides=[f"serve.model_uri={bundle}", "serve.torch_threads=1"]).serve
    with serving_in_thread(direct_server(settings, port=8141)) as base:
        url = f"{base}/v1/predict"
        answers = {}
        for case in cases:
            response = requests.post(url, files={"file": (case.name, case.data)}, data={"sex": "F"}, timeout=60)
            answers[case.name] = (response.status_code, response.json().get("error", ""))
        after = requests.post(url, files={"file": ("hand.png", phantom_png(work))}, data={"sex": "F"}, timeout=60)
        return answers, after.status_code


def main() -> None:
    cases = hostile_files()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        answers, after = api_answers(cases, work)
        prepared = prepare_codes(cases, work)
    table = []
    for case in cases:
        status, code = answers[case.name]
        expected_status = 400 if case.code == EMPTY_FILE else REJECTED_STATUS.get(case.code, 422)
        expected_prepare = REJECT_UNDECODABLE if case.code == EMPTY_FILE else case.code
        table.append({"case": case.name, "what": case.what, "bytes": len(case.data), "expected": case.code,
                      "prepare_rejects": prepared[case.name], "api_status": status, "api_error": code,
                      "as_expected": (code, status, prepared[case.name]) == (case.code, expected_status,
                                                                            expected_prepare)})
    mismatches = [row["case"] for row in table if not row["as_expected"]]
    print(f"{len(table)} hostile files: {len(table) - len(mismatches)} refused as expected by prepare and the API"
          + (f"; mismatches: {mismatches}" if mismatches else "") + f"; a valid phantom afterwards: {after}")
    write_result("hostile", {"cases": len(table), "as_expected": len(table) - len(mismatches),
                             "mismatches": mismatches, "valid_after_all": after, "table": table})


if __name__ == "__main__":
    main()
