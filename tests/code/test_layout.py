"""The project layout guarantees that everything else relies on."""

import subprocess
import sys

from helpers import ROOT, free_port


def test_platform_folder_is_not_a_package():
    assert (ROOT / "platform" / "boneage" / "__init__.py").is_file()
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_is_not_shadowed_from_the_repo_root():
    # Ray jobs and pytest run with the repo root first on sys.path: `platform` must still be the stdlib module.
    code = ("import sys; sys.path.insert(0, '.'); import platform; "
            "print(platform.system()); print(platform.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    system, location = out.stdout.split()
    assert system == "Linux"
    assert not location.startswith(str(ROOT))


def test_jobs_do_nothing_when_imported():
    for job in sorted((ROOT / "jobs").glob("*.py")):
        code = f"import runpy; runpy.run_path({str(job)!r}, run_name='imported')"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "", f"{job.name} printed on import: {out.stdout}"


def test_job_help_lists_its_settings():
    out = subprocess.run([sys.executable, "jobs/prepare.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    assert "data.image_size" in out.stdout and "--set" in out.stdout


def test_the_query_job_does_not_import_ray(tmp_path):
    """The HTTP client job loads no Ray: not for --help, not for a query (here to a port where nothing listens,
    which ends in its one-line error)."""
    hand = tmp_path / "hand.png"
    hand.write_bytes(bytes.fromhex("89504e470d0a1a0a"))  # the client sends the file as it is
    code = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as end:\n    print('exit', end.code)\n"
            "print('ray imported' if 'ray' in sys.modules else 'no ray')")
    query = str(ROOT / "jobs" / "query.py")
    runs = {"help": [query, "--help"],
            "query": [query, "--url", f"http://127.0.0.1:{free_port()}", "--file", str(hand), "--sex", "F"]}
    for what, argv in runs.items():
        out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.stdout.splitlines()[-2:] == ["exit " + ("0" if what == "help" else "1"), "no ray"], (what, out)
        assert what == "help" or out.stderr.startswith("error: "), out.stderr
