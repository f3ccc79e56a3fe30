"""The README's shell and Python snippets work as written.

Every ```bash and ```python block in README.md has a marker on the line just before its opening fence, an HTML
comment that GitHub does not show:

    <!-- readme-test: run -->
    <!-- readme-test: skip (why it cannot run here, e.g. needs a Ray cluster) -->

A block without one fails ``test_every_snippet_is_marked``, so whoever adds a block decides. Blocks marked ``run``
execute for real (bash -e, or python), each in the same temporary copy of the project, whose ``outputs/`` holds
what ``make demo`` leaves there, in miniature (``project`` below): the phantoms, their 32 px prepared dataset, and
a registered ``boneage-vgg16:best``. ``python`` is the interpreter running the tests, with the library it imports,
and a job's Ray is a local one of its own, as on a machine without a cluster. Only SUBSTITUTIONS change a block
before it runs. A run block must exit 0, print the line EXPECTED_OUTPUT gives for each command it runs, and write
nothing outside ``outputs/``. Running them is slow (each job starts Python, Torch and Ray); the marker check is not.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import ROOT, make_bundle

README = ROOT / "README.md"
SHELL, PYTHON = "bash", "python"
LANGUAGES = {"bash": SHELL, "sh": SHELL, "shell": SHELL, "python": PYTHON, "py": PYTHON}
FENCE = re.compile(r"^ {0,3}```\s*(\w*)")
MARKER = re.compile(r"^<!-- readme-test: (?:(run)|skip \((.+)\)) -->$")
MARKER_HELP = ("put one of these on the line just before its opening fence:\n"
               "    <!-- readme-test: run -->\n"
               "    <!-- readme-test: skip (why it cannot run in a test, e.g. needs a Ray cluster) -->\n"
               "(see tests/code/test_readme.py for what a run block finds in outputs/)")

# What makes a run block quick, and the user's RSNA download (/data/...) the phantoms: (README text, replacement).
# Each entry must still match a run block (test_substitutions_are_all_used), so the table stays minimal.
SUBSTITUTIONS = [
    ("/data/rsna/boneage-training-dataset.csv", "outputs/phantoms/boneage-training-dataset.csv"),
    ("data.images=/data/rsna", "data.images=outputs/phantoms"),
    ("data.out=/data/prepared/", "data.out=outputs/prepared/"),
    ("data.image_size=256", "data.image_size=32"),
]

# For each command a run block may contain (a regex on the block), the line it must print (a regex on stdout).
EXPECTED_OUTPUT = {
    r"jobs/prepare\.py": r"^prepared: outputs/prepared/\S+$",
    r"jobs/preview_augment\.py": r"^preview: outputs/\S+\.png$",
    r"boneage\.bundle": r"^bone age: \d+\.\d months$",
}


@dataclass(frozen=True)
class Snippet:
    """One fenced block of README.md and the marker before it."""

    line: int  # of the opening fence, 1-based
    language: str  # SHELL or PYTHON
    code: str
    marker: str  # the line before the fence

    @property
    def run(self) -> bool:
        match = MARKER.match(self.marker)
        return bool(match and match.group(1))

    def __str__(self) -> str:
        return f"README.md line {self.line}: {self.code.strip().splitlines()[0][:60]}"


def readme_snippets(text: str) -> list[Snippet]:
    """The bash and python blocks of a Markdown text, in order (other languages are not commands)."""
    lines, snippets, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        if fence.group(1) in LANGUAGES:
            snippets.append(Snippet(i + 1, LANGUAGES[fence.group(1)], "\n".join(lines[i + 1:end]) + "\n",
                                    lines[i - 1].strip() if i else ""))
        i = end + 1
    return snippets


SNIPPETS = readme_snippets(README.read_text())
RUN = [s for s in SNIPPETS if s.run]


def test_every_snippet_is_marked():
    unmarked = [f"{s} has no readme-test marker" if not s.marker.startswith("<!-- readme-test") else
                f"{s} has a malformed marker {s.marker!r}" for s in SNIPPETS if not MARKER.match(s.marker)]
    assert not unmarked, "\n".join(unmarked) + "\nFor each, " + MARKER_HELP


def test_markers_read_as_intended():
    sample = ("intro\n<!-- readme-test: skip (needs a Ray cluster) -->\n```bash\nray start --head\n```\n\n"
              "```python\nx = 1\n```\n")
    skipped, unmarked = readme_snippets(sample)
    assert (skipped.line, skipped.language, skipped.code, skipped.run) == (3, SHELL, "ray start --head\n", False)
    assert MARKER.match(skipped.marker).group(2) == "needs a Ray cluster"
    assert (unmarked.line, unmarked.marker, unmarked.run) == (7, "", False)
    assert readme_snippets("<!-- readme-test: run -->\n```py\nx = 1\n```\n")[0].run


def test_substitutions_are_all_used():
    unused = [old for old, _ in SUBSTITUTIONS if not any(old in s.code for s in RUN)]
    assert not unused, f"SUBSTITUTIONS entries that match no run block in README.md (remove them): {unused}"


def rewrite(code: str) -> str:
    """The block as the test runs it."""
    for old, new in SUBSTITUTIONS:
        code = code.replace(old, new)
    return code


def expected_lines(code: str) -> list[str]:
    """The output lines a block's commands must print; fails when the block runs a command this test does not know."""
    expected = [line for command, line in EXPECTED_OUTPUT.items() if re.search(command, code)]
    assert expected, ("a run block runs no command listed in EXPECTED_OUTPUT in tests/code/test_readme.py: add the "
                      "line it prints there (or mark the block skip, with the reason)")
    return expected


@pytest.fixture(scope="module")
def project(phantom_dir, ray_session, tmp_path_factory) -> Path:
    """A copy of the project as a clone has it, with ``outputs/`` as ``make demo`` leaves it, in miniature:
    ``outputs/phantoms`` (the session's 60 phantoms at 64 px), ``outputs/prepared/phantoms-32`` (configs/demo.yaml's
    data.out) and ``outputs/registry`` with a random-weights 32 px bundle as ``boneage-vgg16:best``."""
    from boneage.bundle import promote_if_better, register
    from boneage.config import load_config
    from boneage.prepare import prepare_dataset

    copy = tmp_path_factory.mktemp("readme") / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build", "*.egg-info",
                                                               "__pycache__", ".pytest_cache"))
    outputs = copy / "outputs"
    shutil.copytree(phantom_dir, outputs / "phantoms")
    prepare_dataset(load_config(copy / "configs" / "demo.yaml", [
        f"data.labels={outputs / 'phantoms' / 'boneage-training-dataset.csv'}",
        f"data.images={outputs / 'phantoms'}", f"data.out={outputs / 'prepared' / 'phantoms-32'}"]))
    bundle, _ = make_bundle(tmp_path_factory.mktemp("bundle"), size=32, name="boneage-vgg16")
    assert promote_if_better(register(bundle, outputs / "registry", "boneage-vgg16"), outputs / "registry",
                             "boneage-vgg16").promoted
    return copy


def files_outside_outputs(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")
            if p.relative_to(folder).parts[0] != "outputs" and "__pycache__" not in p.parts}


def user_environment(session_temp: Path) -> dict[str, str]:
    """A user's shell on a machine without a Ray cluster: ``python`` is the tests' interpreter with the library
    they import, and a job's Ray is a local one of its own (RAY_ADDRESS=local, not the session's, whose workers
    run in another folder), kept under the session's temp dir so the session-end check sees it exit."""
    import boneage

    ray_temp = session_temp / "readme"
    ray_temp.mkdir(exist_ok=True)
    library = str(Path(boneage.__file__).parents[1])
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join(filter(None, [library, os.environ.get("PYTHONPATH")])),
            "RAY_ADDRESS": "local", "RAY_TMPDIR": str(ray_temp)}


@pytest.mark.slow
@pytest.mark.parametrize("snippet", RUN, ids=lambda s: f"line{s.line}")
def test_readme_snippet_runs(snippet, project, session_temp):
    code = rewrite(snippet.code)
    command = ["bash", "-e", "-o", "pipefail", "-c", code] if snippet.language == SHELL else ["python", "-c", code]
    before = files_outside_outputs(project)
    done = subprocess.run(command, cwd=project, env=user_environment(session_temp), capture_output=True, text=True,
                          timeout=300)
    log = f"{snippet}, run as:\n{code}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, log
    for line in expected_lines(code):
        assert re.search(line, done.stdout, re.MULTILINE), f"no line matching {line!r} in the output of {log}"
    written = files_outside_outputs(project) - before
    assert not written, f"it wrote {sorted(map(str, written))} outside outputs/: {log}"
