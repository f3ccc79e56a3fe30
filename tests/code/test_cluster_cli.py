"""boneage.cluster without a cluster: the jobs' runtime env, and one-line refusals."""

import os
import subprocess
import sys
from pathlib import Path

import boneage
from boneage.cluster import job_runtime_env
from helpers import ROOT, free_port


def test_runtime_env_names_this_interpreter_and_ships_the_library():
    env = job_runtime_env()
    assert env["py_executable"] == sys.executable
    assert env["env_vars"]["PATH"] == f"{Path(sys.executable).parent}:${{PATH}}"  # the entrypoint's `python`
    assert env["py_modules"] == [str(Path(boneage.__file__).resolve().parent)] and env["working_dir"] == "."
    assert "env_vars" not in job_runtime_env("python")  # the nodes' own interpreter (cluster.yaml)


def cluster_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}  # an address elsewhere must not matter
    return subprocess.run([sys.executable, "-m", "boneage.cluster", "--state", str(tmp_path / "none.json"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_submit_refuses_in_one_line_where_no_cluster_answers(tmp_path):
    for args in (["submit", "--address", f"http://127.0.0.1:{free_port()}"], ["submit"]):
        result = cluster_cli(tmp_path, *args, "--", "python", "jobs/train.py")
        assert result.returncode == 1
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
