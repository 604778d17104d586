"""Fixtures shared by the test files.

Model and feature folders are built once per session and shared read-only; the
builders and their sizes are those of ``tests.helpers.models`` and
``tests.helpers.features``. A test that changes such a folder, renames it, or needs it
at a path of its own works on a copy (``tests.helpers.models.copy_model``). Each shared
folder is compared byte for byte with what was built when the session ends, so a test
that writes into one fails there instead of quietly changing what later tests see.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.helpers.features import scene_table, write_features
from tests.helpers.loopback import LoopbackServer
from tests.helpers.models import (folder_digest, make_tiny_clip, save_hub_like_clip, save_hub_like_gpt,
                                  save_tiny_gpt, torch_threads)
from tests.helpers.project_guard import changes, message, snapshot

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------ the user's project
@pytest.fixture(scope="session", autouse=True)
def suite_workdir(tmp_path_factory) -> Iterator[Path]:
    """The suite runs in an empty folder of its own, never in the project root: a default
    path (``data/models/clip``, ``params.yaml``) a test forgot to pass resolves there, not to
    the user's pipeline outputs. Subprocesses still import this checkout (PYTHONPATH). The
    whole session is checked against a snapshot of the project, fixtures' set-up included."""
    before = snapshot(ROOT)
    workdir = tmp_path_factory.mktemp("cwd")
    old_cwd, old_path = os.getcwd(), os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), old_path) if p)
    os.chdir(workdir)
    yield workdir
    os.chdir(old_cwd)
    if old_path is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_path
    diff = changes(before, snapshot(ROOT))
    if diff:
        raise AssertionError(message(ROOT, "the test session", diff))


@pytest.fixture(autouse=True)
def project_untouched(request) -> Iterator[None]:
    """Each test leaves the project's files (data/, .dvc/tmp, dvc_plots/, git refs, ...) as it
    found them; the failure names the test and the paths."""
    before = snapshot(ROOT)
    yield
    diff = changes(before, snapshot(ROOT))
    if diff:
        pytest.fail(message(ROOT, request.node.nodeid, diff), pytrace=False)


def _check_unchanged(folder: Path, digest: str) -> None:
    if folder_digest(folder) != digest:
        raise AssertionError(f"a test changed the shared folder {folder}: work on a copy (copy_model)")


def _shared(tmp_path_factory: pytest.TempPathFactory, label: str, build: Callable[[Path], Path]) -> Iterator[Path]:
    folder = build(tmp_path_factory.mktemp(label))
    digest = folder_digest(folder)
    yield folder
    _check_unchanged(folder, digest)


# ------------------------------------------------------------------------- models
@pytest.fixture(scope="session")
def tiny_gpt_dir(tmp_path_factory) -> Iterator[Path]:
    """``save_tiny_gpt()``: the scene-word GPT-2 (n_embd 32, 2 layers, 2 heads, 64 positions,
    seed 0), in a folder named ``gpt`` (its model id: it has no pin)."""
    yield from _shared(tmp_path_factory, "tiny-gpt", lambda d: save_tiny_gpt(d / "gpt"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Iterator[Path]:
    """``make_tiny_clip()``: a random CLIP vision tower (image 32, patch 8, hidden 32, 2 layers,
    projection 16, seed 0) with a CLIPImageProcessor, no pin, in a folder named ``clip``."""
    yield from _shared(tmp_path_factory, "tiny-clip", lambda d: make_tiny_clip(d / "clip"))


@pytest.fixture(scope="session")
def hub_clip_dir(tmp_path_factory) -> Iterator[Path]:
    """``save_hub_like_clip()``: the demo CLIP builder at ``TINY_CLIP`` (hidden 32, 1 layer,
    2 heads, patch 8, projection 16, no pre-training, seed 0) for 32-pixel images."""
    yield from _shared(tmp_path_factory, "hub-clip", lambda d: save_hub_like_clip(d / "hub_clip"))


@pytest.fixture(scope="session")
def hub_gpt_dir(tmp_path_factory) -> Iterator[Path]:
    """``save_hub_like_gpt()``: a GPT-2 whose tokenizer has no pad token, like gpt2's."""
    yield from _shared(tmp_path_factory, "hub-gpt", lambda d: save_hub_like_gpt(d / "hub_gpt"))


# ----------------------------------------------------------------------- features
@pytest.fixture(scope="session")
def scene_features(tmp_path_factory) -> Iterator[Callable[..., Path]]:
    """``scene_features(n_per_class=4, shards=2, **scene_table_kw)``: a folder (named
    ``features``) of ``shards`` feature shards holding ``scene_table(n_per_class, ...)``,
    written once per session for each set of arguments. Build the table object itself
    with ``scene_table`` (the same arguments give the same table) when a test needs it."""
    made: dict[tuple, tuple[Path, str]] = {}

    def get(n_per_class: int = 4, shards: int = 2, **table_kw) -> Path:
        key = (n_per_class, shards, tuple(sorted(table_kw.items())))
        if key not in made:
            folder = write_features(tmp_path_factory.mktemp("scene-features") / "features",
                                    scene_table(n_per_class, **table_kw), shards)
            made[key] = (folder, folder_digest(folder))
        return made[key][0]

    yield get
    for folder, digest in made.values():
        _check_unchanged(folder, digest)


# ------------------------------------------------------------------ HTTP loopback
@pytest.fixture
def loopback() -> Iterator[LoopbackServer]:
    """A LoopbackServer on 127.0.0.1 (a free port), started for the test and stopped after it.
    Add routes with ``loopback.route(path, Reply(...))``; set ``loopback.latency`` to delay
    every reply."""
    with LoopbackServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def module_loopback() -> Iterator[LoopbackServer]:
    """A LoopbackServer shared by a module's fixtures, stopped when the module is done."""
    with LoopbackServer() as srv:
        yield srv


# -------------------------------------------------------------------------- torch
@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a whole module (its module-scoped fixtures included): tiny
    models on a shared, busy machine only wait on extra threads. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    with torch_threads(1):
        yield
