"""Issue 16's hostile corpus against the service: every hostile file (:mod:`boneage.phantoms.hostile`) and every
malformed request (lying Content-Length, a chunked body past the limit, repeated or wrongly encoded fields,
path-traversal and unicode file names) is refused with a 4xx JSON error and its reason code, on the plain server
and through Ray Serve, and the service keeps answering."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import requests

from boneage.api import REJECTED_STATUS
from boneage.phantoms.hostile import EMPTY_FILE, hostile_files
from cases import post

BOUNDARY = "hostile"


def expected_status(code: str) -> int:
    return 400 if code == EMPTY_FILE else REJECTED_STATUS.get(code, 422)


@pytest.mark.parametrize("where", ["plain", "serve"])
def test_every_hostile_file_is_refused_with_its_reason_and_the_service_keeps_answering(direct_url, service_url,
                                                                                      phantoms, where):
    url = direct_url if where == "plain" else service_url
    png, sex = phantoms[0]
    for case in hostile_files():
        response = post(url, "predict", case.data, case.name, sex="F")
        assert response.status_code == expected_status(case.code), (case.name, response.text)
        assert response.json()["error"] == case.code, case.name
    assert post(url, "predict", png, sex=sex).status_code == 200


def multipart(fields: list[tuple[str, str | None, bytes]]) -> bytes:
    """A multipart/form-data body of (name, file name or None, value) parts, as raw bytes (any encoding)."""
    parts = []
    for name, filename, value in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def raw_exchange(url: str, head: bytes, body: bytes, half_close: bool = False) -> bytes:
    """Send ``head`` and ``body`` on one socket as they are (no client library fixing them) and read the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head + body)
        if half_close:
            connection.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and not half_close:
                break
        return b"".join(chunks)


def status_and_error(raw: bytes) -> tuple[int, str | None]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(body)["error"]
    except (ValueError, KeyError):
        return status, None


def request_head(length: int) -> bytes:
    return (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()


def test_malformed_requests_are_refused_with_reasons(direct_url, phantoms, tmp_path):
    png, _ = phantoms[0]
    body = multipart([("sex", None, b"F"), ("file", "hand.png", png)])
    short = raw_exchange(direct_url, request_head(len(body) // 2), body)  # Content-Length says half: the file
    assert status_and_error(short) == (422, "missing_file")  # part is cut off, and the parser drops what is cut
    raw_exchange(direct_url, request_head(len(body) * 2), body, half_close=True)  # says double, then hangs up
    twice = multipart([("sex", None, b"F"), ("sex", None, b"M"), ("file", "hand.png", png)])
    assert status_and_error(raw_exchange(direct_url, request_head(len(twice)), twice)) == (422, "repeated_field")
    two_files = multipart([("sex", None, b"F"), ("file", "a.png", png), ("file", "b.png", png)])
    assert status_and_error(raw_exchange(direct_url, request_head(len(two_files)), two_files)) == (
        422, "repeated_field")
    latin1 = multipart([("sex", None, "é".encode("latin-1")), ("file", "hand.png", png)])
    assert status_and_error(raw_exchange(direct_url, request_head(len(latin1)), latin1)) == (422, "invalid_sex")

    def endless():  # chunked: no Content-Length to refuse early, so the limit stops it while it is read
        yield multipart([("sex", None, b"F")]).removesuffix(f"--{BOUNDARY}--\r\n".encode())
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'.encode()
        for _ in range(64):  # 4 MB of file
            yield b"x" * 65536

    chunked = requests.post(f"{direct_url}/v1/predict", data=endless(), timeout=60,
                            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert (chunked.status_code, chunked.json()["error"]) == (413, "upload_too_large")  # direct_url: 1 MB
    assert post(direct_url, "predict", png, sex="F").status_code == 200  # still answering


@pytest.mark.parametrize("name", ["../../../../hostile-upload.png", "..\\..\\hostile-upload.png",
                                  "/etc/hostile-upload.png", "händ-Ω-𝟙.png", "\u202egnp.exe", "a" * 4096 + ".png"])
def test_file_names_are_never_used_as_paths(direct_url, phantoms, name):
    png, sex = phantoms[0]
    assert post(direct_url, "predict", png, name, sex=sex).status_code == 200  # the name does not matter
    refused = post(direct_url, "predict", b"PK\x03\x04 a zip", name, sex=sex)
    assert (refused.status_code, refused.json()["error"]) == (422, "not_an_image")
    assert name not in refused.text  # not echoed back either
    for folder in (Path.cwd(), Path.cwd().parent, Path("/etc"), Path("/tmp")):
        assert not (folder / "hostile-upload.png").exists()
