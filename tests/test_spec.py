from __future__ import annotations

import os

import pytest

from instances.interpolate import TemplateError, check_template, interpolate
from instances.spec import MAX_SOCKET_PATH, ServiceSpec, default_socket_path

PARENT_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DJANGO_SECRET_KEY": "s3cret",
    "DATABASE_URL": "postgres://u:pw@db/x",
    "AWS_SECRET": "k",
}


def spec(**kw: object) -> ServiceSpec:
    fields: dict[str, object] = {"name": "notes", "command": "python3 app.py", "data_dir": "/srv/t"}
    fields.update(kw)
    return ServiceSpec(**fields)  # type: ignore[arg-type]


def test_interpolation_of_every_placeholder() -> None:
    s = spec(
        command="run --data {data_dir} --id {id} --name {name}",
        env=(("SOCK", "{socket}"), ("CFG", "{config_dir}/x")),
        config_dir="/etc/ten",
    )
    assert s.argv("alice") == [
        "run",
        "--data",
        "/srv/t",
        "--id",
        "alice",
        "--name",
        "notes",
    ]
    env = s.environment("alice", PARENT_ENV)
    assert env["SOCK"] == "/srv/t/run/notes-alice/app.sock" == env["SOCKET_PATH"]
    assert env["CFG"] == "/etc/ten/x"


def test_command_is_split_before_interpolating_so_spaces_in_paths_survive() -> None:
    s = spec(command="app --dir {data_dir}", data_dir="/srv/my data")
    assert s.argv("a") == ["app", "--dir", "/srv/my data"]


def test_args_mean_command_is_not_split() -> None:
    s = spec(command="/opt/my app/bin", args=("--id", "{id}"))
    assert s.argv("bob") == ["/opt/my app/bin", "--id", "bob"]


def test_environment_is_clean_and_identifies_the_instance() -> None:
    env = spec(env=(("GREETING", "hi {id}"),)).environment("alice", PARENT_ENV)
    assert "DJANGO_SECRET_KEY" not in env and "DATABASE_URL" not in env and "AWS_SECRET" not in env
    assert env["PATH"] == "/usr/bin:/bin"
    assert env["GREETING"] == "hi alice"
    assert env["INSTANCE_ID"] == "alice" and env["SERVICE_NAME"] == "notes"
    assert env["DATA_DIR"] == env["HOME"] == "/srv/t/notes/alice"


def test_inherit_env_passes_the_parent_environment() -> None:
    env = spec(inherit_env=True).environment("alice", PARENT_ENV)
    assert env["AWS_SECRET"] == "k"
    assert env["SOCKET_PATH"] == "/srv/t/run/notes-alice/app.sock"


def test_env_cannot_override_socket_or_identity_but_can_set_data_dir() -> None:
    s = spec(
        env=(("SOCKET_PATH", "/evil"), ("INSTANCE_ID", "bob"), ("DATA_DIR", "{data_dir}/{id}"))
    )
    env = s.environment("alice", PARENT_ENV)
    assert env["SOCKET_PATH"] == "/srv/t/run/notes-alice/app.sock"
    assert env["INSTANCE_ID"] == "alice"
    assert env["DATA_DIR"] == "/srv/t/alice"  # upstream configs set DATA_DIR this way


def test_long_socket_paths_are_shortened_under_the_limit() -> None:
    deep = "/srv/" + "d" * 60
    path = default_socket_path(deep, "s" * 63, "i" * 63)
    assert len(os.fsencode(path)) <= MAX_SOCKET_PATH
    assert path.startswith(deep + "/run/")
    deeper = "/srv/" + "d" * 120
    path2 = default_socket_path(deeper, "s" * 63, "i" * 63)
    assert len(os.fsencode(path2)) <= MAX_SOCKET_PATH
    # Distinct instances never share a socket.
    assert path2 != default_socket_path(deeper, "s" * 63, "j" * 63)


def test_workdir_relative_to_config_dir() -> None:
    s = spec(workdir="apps/{name}", config_dir="/etc/ten")
    assert str(s.cwd("a")) == "/etc/ten/apps/notes"
    assert str(spec().cwd("a")) == "/srv/t/notes/a"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{nope}", "unknown placeholder {nope}"),
        ("{id.__class__}", "unknown placeholder"),
        ("{id!r}", "unknown placeholder"),
        ("{id:>10}", "unknown placeholder"),
        ("{", "literal braces"),
    ],
)
def test_bad_templates(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("}", r"\}")):
        check_template(template)


def test_port_is_a_placeholder_but_not_in_socket_or_workdir_templates() -> None:
    from instances.config import SOCKET_PLACEHOLDERS

    check_template("--port {port}")  # command, args, env: the instance's $PORT
    with pytest.raises(TemplateError, match="unknown placeholder"):
        check_template("/run/{port}", SOCKET_PLACEHOLDERS)


def test_literal_braces() -> None:
    check_template("{{json}}")
    assert interpolate("{{x}} {id}", {"id": "a"}) == "{x} a"
