"""The service answers and logs no patient identifier and no image bytes: the identified DICOM of ``images`` (every
identifying attribute of ``boneage.deid``, a private element, marked raw pixels) and its broken copies posted to
every assessment route, on the plain server and through Ray Serve; the answers (headers, JSON, the PNGs in them,
with their text chunks), this process's logs and the Ray runtime's log files (the Serve replica's) are searched."""

from __future__ import annotations

import logging

import pytest

from cases import post
from images import leaked, leaks_in_files, logged, readable, write_identified_dicom


def identified_requests(folder) -> list[tuple[str, bytes, dict, dict, int]]:
    """(route, file, form fields, headers, expected status) covering answers, heat maps and every refusal."""
    good, *broken = [write_identified_dicom(folder / f"{kind or 'good'}.dcm", kind).read_bytes()
                     for kind in ("", "pixels", "header")]
    json_answers = [("predict?canvas=true", good, {}, {}, 200), ("explain?canvas=true", good, {}, {}, 200),
                    ("explain", good, {}, {"Accept": "image/png"}, 200),
                    ("predict", good, {"sex": "M"}, {}, 422)]  # contradicts its PatientSex
    return json_answers + [("predict", data, {"sex": "F"}, {}, 422) for data in broken]


@pytest.mark.parametrize("url", ["direct_url", "service_url"])
def test_answers_and_logs_hold_no_identifier(url, request, tmp_path, ray_logs, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    base = request.getfixturevalue(url)
    for route, data, fields, headers, status in identified_requests(tmp_path):
        response = post(base, route, data, "hand.dcm", headers, **fields)
        assert response.status_code == status, (route, response.text)
        answer = readable(response.content + repr(dict(response.headers)).encode())
        assert leaked(answer) == [], route
    assert leaked(logged(caplog, capfd)) == []
    if url == "service_url":
        assert leaks_in_files(ray_logs) == {}  # the replica's and the proxy's logs among them
