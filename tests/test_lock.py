"""The lock files pin everything setup.cfg asks for, with hashes, within its floors.

requirements/cpu.lock and requirements/cuda.lock are what ./run installs (with
``pip install --require-hashes --no-deps``); setup.cfg keeps the floors for people who
``pip install`` capline. The checker is also run on doctored copies of a lock, so that
a lock that misses a package, leaves one unpinned, pins one below its floor or lists
no hash for it is known to fail.
"""
from __future__ import annotations

import configparser
import itertools
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = [ROOT / "requirements" / "cpu.lock", ROOT / "requirements" / "cuda.lock"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")
# Packages only the CUDA build of torch brings.
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")


def setup_cfg_requirements() -> list[Requirement]:
    """install_requires and the test and deploy extras of setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    texts = [cfg["options"]["install_requires"]]
    texts += [cfg["options.extras_require"][extra] for extra in ("test", "deploy")]
    lines = [line.strip() for text in texts for line in text.splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def lock_entries(text: str) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, hashes)} of a lock file in pip's requirements format.
    A line that is neither a comment, a hash nor a ``name==version`` pin is an entry
    without a version (an unpinned requirement), recorded as ``("", [])``."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for entry in re.sub(r"\\\n", " ", text).splitlines():
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        pin = PIN.match(entry)
        if pin:
            entries[canonicalize_name(pin.group(1))] = (pin.group(2), HASH.findall(entry))
        else:
            name = re.match(r"[A-Za-z0-9._-]+", entry)
            entries[canonicalize_name(name.group(0) if name else entry)] = ("", [])
    return entries


def lock_problems(requirements: list[Requirement], text: str) -> list[str]:
    """What is wrong with a lock's text: each requirement must be pinned (==) at a version
    its specifier allows, every entry must list a hash, and the header must name the
    command that regenerates the lock."""
    problems = []
    header = list(itertools.takewhile(lambda line: line.startswith("#"), text.splitlines()))
    if not any("`./run lock`" in line for line in header):
        problems.append("the header does not name `./run lock`")
    entries = lock_entries(text)
    for req in requirements:
        name = canonicalize_name(req.name)
        if name not in entries:
            problems.append(f"{req.name}: not in the lock")
            continue
        version, _ = entries[name]
        if not version:
            problems.append(f"{req.name}: not pinned with ==")
        elif not req.specifier.contains(Version(version), prereleases=True):
            problems.append(f"{req.name}: {version} is outside setup.cfg's {req.specifier}")
    for name, (version, hashes) in entries.items():
        if version and not hashes:
            problems.append(f"{name}: no --hash")
    return list(dict.fromkeys(problems))  # onnx is in both extras: one message


@pytest.fixture(scope="module")
def requirements() -> list[Requirement]:
    reqs = setup_cfg_requirements()
    assert {"torch", "transformers", "open-clip-torch", "pytest", "onnxruntime"} <= {
        canonicalize_name(r.name) for r in reqs}
    return reqs


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_the_lock_pins_setup_cfgs_requirements_with_hashes(requirements, lock):
    text = lock.read_text()
    assert lock_problems(requirements, text) == []
    assert "CPython 3.11" in text.split("\n", 4)[1]  # the header says what the lock is for


def test_the_cpu_lock_holds_torchs_cpu_build_and_the_cuda_lock_its_cuda_build():
    cpu, cuda = (lock_entries(lock.read_text()) for lock in LOCKS)
    assert cpu["torch"][0].endswith("+cpu") and "+" not in cuda["torch"][0]
    assert Version(cpu["torch"][0]).public == Version(cuda["torch"][0]).public
    assert not [name for name in cpu if CUDA_ONLY.match(name)]
    assert any(name.startswith("nvidia-") for name in cuda)


def test_both_locks_pin_the_same_versions_but_for_torchs_build():
    """The CPU and CUDA environments run the same code: only torch's build and the
    packages that build brings differ."""
    cpu, cuda = ({name: version for name, (version, _) in lock_entries(lock.read_text()).items()
                  if name != "torch" and not CUDA_ONLY.match(name)} for lock in LOCKS)
    assert cpu == cuda


def test_torchvision_matches_torch():
    """An unpinned open_clip_torch install pulls the newest torchvision, which upgrades
    torch: the locks pin the torchvision made for their torch."""
    for lock in LOCKS:
        entries = lock_entries(lock.read_text())
        torch, vision = Version(entries["torch"][0]), Version(entries["torchvision"][0])
        # torchvision 0.N+15 is the release made for torch 2.N (0.28 for 2.13)
        assert (torch.major, vision.major, vision.minor) == (2, 0, torch.minor + 15), \
            f"{lock.name}: torch {torch}, torchvision {vision}"


def test_the_checker_finds_what_a_doctored_lock_lacks(requirements):
    text = LOCKS[0].read_text()
    assert lock_problems(requirements, text) == []

    def doctored(pattern: str, replacement: str) -> list[str]:
        changed = re.sub(pattern, replacement, text, count=1, flags=re.MULTILINE)
        assert changed != text, pattern
        return lock_problems(requirements, changed)

    # a package taken out (its pin, hashes and annotations)
    assert doctored(r"(?s)^transformers==.*?(?=^\S)", "") == ["transformers: not in the lock"]
    # a pin loosened to a floor
    assert doctored(r"^onnxruntime==\S+", "onnxruntime>=1.32") == ["onnxruntime: not pinned with =="]
    # a pin below setup.cfg's floor
    assert doctored(r"^pydantic==\S+", "pydantic==2.5.0") == ["pydantic: 2.5.0 is outside setup.cfg's >=2.6"]
    # a pin without its hashes (a dependency of a dependency, too)
    assert doctored(r"^(six==\S+) \\\n(\s+--hash=\S+ \\\n)*\s+--hash=\S+", r"\1") == ["six: no --hash"]
    # a header that does not say how to regenerate it
    assert doctored(r"`\./run lock`", "uv pip compile") == ["the header does not name `./run lock`"]


def test_run_installs_the_locks_with_hashes():
    run = (ROOT / "run").read_text()
    assert "--require-hashes --no-deps -r" in run
    for lock in LOCKS:
        assert str(lock.relative_to(ROOT)) in run
        assert (lock.parent / (lock.stem + ".in")).exists()
    # the set-up stamp changes when the lock does
    assert re.search(r'want="\$\(cat [^)]*"\$lock" ', run)
