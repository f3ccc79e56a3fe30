"""precision: auto: what it resolves to on this machine's CPU, and that each job says what it computes in."""

from pathlib import Path

import pytest
import torch

from boneage.precision import AUTO_ON_CPU, cpu_kind, describe, resolve_precision

CPU = torch.device("cpu")


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("no /proc/cpuinfo flags on this system")


def test_the_cpu_kind_follows_the_cpus_flags():
    flags = cpu_flags()
    expected = "amx" if "amx_tile" in flags else "avx512_bf16" if "avx512_bf16" in flags else "fp32_only"
    assert cpu_kind() == expected


@pytest.mark.parametrize("job", ["train", "predict"])
def test_auto_resolves_as_measured_for_this_kind_of_cpu(job):
    assert resolve_precision("auto", CPU, job) == AUTO_ON_CPU[cpu_kind()][job]
    if cpu_kind() != "fp32_only":  # AMX and avx512_bf16 CPUs both train and predict faster in bf16
        assert resolve_precision("auto", CPU, job) == "bf16"
    else:
        assert resolve_precision("auto", CPU, job) == "fp32"


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_an_explicit_precision_is_kept_and_said_so(asked):
    assert resolve_precision(asked, CPU, "train") == asked
    assert describe(CPU, asked, "predict") == f"precision {asked} (as configured), device cpu"


def test_auto_says_why_it_chose():
    line = describe(CPU, "auto", "train")
    assert line.startswith(f"precision {resolve_precision('auto', CPU, 'train')} (auto on ")
    assert line.endswith("device cpu")
