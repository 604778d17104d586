"""DVC can never call a stage up to date while its code changed: every module a stage's
command runs (followed through imports, including those inside functions and package
``__init__`` files) is covered by one of that stage's deps, and the paths in each
command are the paths the stage declares."""
from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path

import yaml

from tests.helpers.dvc_deps import ROOT, imports_of, missing_deps, modules_run_by, undeclared_paths

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_module_a_stage_runs_is_one_of_its_deps():
    missing = missing_deps(DVC)
    assert not missing, "stages run code they do not depend on:\n" + "\n".join(f"  {s}: {f}" for s, f in missing)


def test_removing_a_dep_is_caught():
    broken = copy.deepcopy(DVC)
    broken["stages"]["train"]["deps"].remove("pipeline/core")
    broken["stages"]["evaluate"]["deps"].remove("pipeline/evaluate")
    missing = missing_deps(broken)
    assert ("train", "pipeline/core/runtime.py") in missing
    assert ("evaluate", "pipeline/evaluate/run.py") in missing
    assert all(stage in ("train", "evaluate") for stage, _ in missing)


def test_imports_inside_functions_and_package_inits_are_followed():
    run = {p.relative_to(ROOT).as_posix() for p in modules_run_by(["stages.cli", "stages.train"])}
    # stages/train.py imports pipeline.train.run inside its command function.
    assert "pipeline/train/run.py" in run
    # Importing pipeline.models.captioner runs pipeline/__init__.py and pipeline/models/__init__.py.
    assert {"pipeline/__init__.py", "pipeline/models/__init__.py"} <= run


def test_commands_name_exactly_the_paths_their_stages_declare():
    assert undeclared_paths(DVC) == []
    broken = copy.deepcopy(DVC)
    broken["stages"]["train"]["cmd"] = broken["stages"]["train"]["cmd"].replace("data/features", "data/feats")
    problems = undeclared_paths(broken)
    assert ("train", "command names data/feats but the stage does not declare it") in problems


def test_stages_import_only_what_they_run():
    # A stage that fetches images needs no model code, and one that trains needs no
    # downloader: package __init__ files import nothing, so nothing is dragged in.
    download = {p.relative_to(ROOT).as_posix() for p in modules_run_by(["stages.cli", "stages.download"])}
    assert not any(p.startswith(("pipeline/models", "pipeline/embed", "pipeline/evaluate")) for p in download)
    train = {p.relative_to(ROOT).as_posix() for p in modules_run_by(["stages.cli", "stages.train"])}
    assert not any(p.startswith(("pipeline/download", "pipeline/prepare", "pipeline/prepare", "pipeline/evaluate"))
                   for p in train)


def _package(path: Path) -> str:
    """pipeline/models/x.py -> pipeline.models; pipeline/train/run.py -> pipeline.train.run."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:2])


def test_no_import_cycle_between_pipeline_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for path in (ROOT / "pipeline").rglob("*.py"):
        here = _package(path)
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] != "pipeline" or len(parts) < 2:
                continue
            there = ".".join(parts[:2])
            if there != here and ((ROOT / "pipeline" / parts[1]).is_dir() or
                                  (ROOT / "pipeline" / f"{parts[1]}.py").is_file()):
                graph[here].add(there)

    def cycle_from(start: str) -> list[str]:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in trail:
                    stack.append((nxt, trail + [nxt]))
        return []

    cycles = [c for c in (cycle_from(p) for p in list(graph)) if c]
    assert not cycles, "import cycles between pipeline packages: " + "; ".join(" -> ".join(c) for c in cycles)


# The tree mirrors the DAG: one package per stage, in the DAG's order, above the shared
# packages. A package may import shared packages and the packages of earlier stages only.
SHARED = ("core", "formats", "models", "text")
STAGES = ("prepare", "pin", "download", "embed", "retrieval", "train", "scst", "generate", "evaluate", "caption",
          "transfer", "imports", "export", "serve")


def _package_imports() -> set[tuple[str, str]]:
    """(importing package, imported package) over every module in pipeline/."""
    edges = set()
    for path in (ROOT / "pipeline").rglob("*.py"):
        here = path.relative_to(ROOT / "pipeline").parts[0]
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] == "pipeline" and len(parts) > 1 and parts[1] != here:
                edges.add((here, parts[1]))
    return edges


def layering_problems(edges: set[tuple[str, str]]) -> list[str]:
    problems = []
    for here, there in sorted(edges):
        if there not in SHARED + STAGES:
            problems.append(f"pipeline.{here} imports pipeline.{there}, which is neither shared nor a stage")
        elif here in SHARED and there in STAGES:
            problems.append(f"shared package pipeline.{here} imports the stage package pipeline.{there}")
        elif here in STAGES and there in STAGES and STAGES.index(there) > STAGES.index(here):
            problems.append(f"stage package pipeline.{here} imports pipeline.{there}, a later stage")
    return problems


def test_pipeline_holds_one_package_per_stage_and_the_shared_packages_only():
    top = {p.name for p in (ROOT / "pipeline").iterdir() if p.name != "__pycache__"}
    assert top == {"__init__.py", *SHARED, *STAGES}


def test_no_package_imports_a_later_stage():
    edges = _package_imports()
    assert ("caption", "download") in edges and ("evaluate", "embed") in edges  # the walk sees imports
    assert layering_problems(edges) == []
    assert layering_problems(edges | {("text", "evaluate"), ("train", "generate")}) == [
        "shared package pipeline.text imports the stage package pipeline.evaluate",
        "stage package pipeline.train imports pipeline.generate, a later stage"]
