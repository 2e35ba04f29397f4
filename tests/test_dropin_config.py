"""Upstream tenement 0.2.2's own configs, read from its repository unchanged: they load
(their keys enforced) or are refused with the key, the reason and what to do instead."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from instances.config import ConfigError, load_config
from instances.spec import ServiceSpec
from tests.conftest import REPO

UPSTREAM_REPO = Path("/work/.mirror/russellromney+tenement/repo")
TAG = "v0.2.2"


def upstream_file(path: str) -> str:
    """A file of upstream's repository at v0.2.2 (the mirror is a bare git repository)."""
    if not UPSTREAM_REPO.exists():
        pytest.fail(f"{UPSTREAM_REPO} is missing: the upstream mirror is needed")
    return subprocess.run(
        ["git", "-C", str(UPSTREAM_REPO), "show", f"{TAG}:{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


# What upstream's READMEs have you build before `ten serve`: the config names the output.
BUILT = {
    "go-http": ["server"],
    "multi-env": ["apps/go/go-worker", "apps/rust/target/release/rust-cache"],
}


def copy_example(tmp: Path, example: str) -> Path:
    """Upstream's example folder as its README has you use it: its files, and the
    programs it says to build first (empty executables here: only their presence is
    checked when the config loads; nothing runs)."""
    folder = tmp / example
    where = f"examples/{example}"
    listing = subprocess.run(
        ["git", "-C", str(UPSTREAM_REPO), "ls-tree", "-r", "--name-only", TAG, where],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for path in listing:
        target = folder / Path(path).relative_to(where)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(upstream_file(path))
        if target.suffix == ".sh":
            target.chmod(0o755)
    for built in BUILT.get(example, []):
        (folder / built).parent.mkdir(parents=True, exist_ok=True)
        (folder / built).write_text("")
        (folder / built).chmod(0o755)
    return folder


def load_upstream(tmp: Path, example: str) -> object:
    folder = copy_example(tmp, example)
    return load_config(folder / "tenement.toml", tmp / "data")


def test_a_relative_command_missing_from_the_config_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "tenement.toml").write_text('[service.web]\ncommand = "./server.sh"\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "tenement.toml", tmp_path / "data")
    assert "'./server.sh' does not exist" in str(info.value)
    (tmp_path / "server.sh").write_text("#!/bin/sh\n")
    load_config(tmp_path / "tenement.toml", tmp_path / "data")  # found where it will run


@pytest.mark.parametrize("example", ["hello-world", "node-fastify", "go-http", "multi-env"])
def test_upstream_examples_load_unchanged(tmp_path: Path, example: str) -> None:
    config = load_upstream(tmp_path, example)
    for name, fields in config.services.items():  # type: ignore[attr-defined]
        spec = ServiceSpec(
            name=name,
            command=fields["command"],
            data_dir=fields["data_dir"],
            config_dir=fields["config_dir"],
            workdir=fields["workdir"],
        )
        # Relative commands run from the config file's folder, as upstream's do.
        assert spec.cwd("alice") == tmp_path / example


def test_multi_runtime_loads_with_its_data_dir_entries(tmp_path: Path) -> None:
    if shutil.which("go") is None:
        pytest.fail("go is missing: scripts/system-deps.sh test installs golang-go")
    config = load_upstream(tmp_path, "multi-runtime")
    py = config.services["pyapi"]  # type: ignore[attr-defined]
    # DATA_DIR = "{data_dir}/pyapi/{id}" names the tenant's own folder: accepted.
    assert py["env"]["DATA_DIR"] == "{data_dir}/pyapi/{id}"
    assert py["isolation"] == "process" and py["restart"] == "on-failure"


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        # {data_dir}/{id}: tenants of two services with one id would share a folder.
        ("auth-test", "service.notes.env.DATA_DIR: set by tenement to the tenant's own"),
        # {data_dir}: every tenant would share one folder.
        ("multi-tenant", "service.notes.env.DATA_DIR: set by tenement to the tenant's own"),
    ],
)
def test_upstream_examples_that_share_folders_are_refused_with_the_reason(
    tmp_path: Path, example: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_upstream(tmp_path, example)
    assert expected in str(info.value) and "remove it" in str(info.value)


def test_upstream_e2e_keys_are_enforced(tmp_path: Path) -> None:
    """The keys of upstream's scripts/e2e.sh config: restart, backoff_base_ms = 0,
    INSTANCE_ID = "{id}", MARKER_PATH under the tenant's folder."""
    (tmp_path / "identify.sh").write_text("#!/bin/sh\n")  # the e2e script writes its own
    (tmp_path / "tenement.toml").write_text(
        "[settings]\nhealth_check_interval = 1\nbackoff_base_ms = 0\n"
        '[service.crash]\ncommand = "./identify.sh"\nhealth = "/"\nisolation = "process"\n'
        'restart = "on-failure"\n[service.crash.env]\nINSTANCE_ID = "{id}"\n'
        'MARKER_PATH = "{data_dir}/{name}/{id}/marker.txt"\n'
    )
    config = load_config(tmp_path / "tenement.toml", tmp_path / "data")
    assert config.settings.backoff_base_ms == 0
    assert config.services["crash"]["restart"] == "on-failure"


def test_our_own_example_configs_still_load() -> None:
    for path in sorted((REPO / "examples").glob("**/tenement.toml")):
        load_config(path, path.parent / "data")
