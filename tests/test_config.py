from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from instances.config import ConfigError, load_config
from instances.models import Instance, Service, SupervisorSettings
from instances.sync import apply_config, start_config_instances

FULL = """
[settings]
data_dir = "data"
health_check_interval = 5
max_restarts = 4
restart_window = 120
backoff_base_ms = 200
backoff_max_ms = 5000
idle_timeout = 600
wake_timeout = 20
startup_timeout = 15
log_retention_lines = 500

[service.notes]
command = "python3 app.py --id {id}"
args = []
socket = "{data_dir}/sockets/{name}-{id}.sock"
health = "/healthz"
workdir = "apps/{name}"
inherit_env = false
idle_timeout = 30
startup_timeout = 7
request_timeout = 40
wake_timeout = 9
stop_timeout = 3
log_retention_lines = 50
always_on = ["vip"]
isolation = "namespace"
memory_limit_mb = 256
cpu_shares = 512
storage_quota_mb = 1024
storage_persist = true

[service.notes.env]
GREETING = "hello {id} from {name}"
SOCK = "{socket}"

[service.api]
command = "python3"
args = ["server.py", "--data", "{data_dir}/{id}"]

[instances]
notes = ["alice", "bob"]
api = ["alice"]
"""


def write(tmp: Path, text: str, name: str = "tenement.toml") -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp: Path, text: str):
    return load_config(write(tmp, text), tmp / "default-data")


def test_every_key_is_read(tmp_path: Path) -> None:
    config = load(tmp_path, FULL)
    notes = config.services["notes"]
    assert config.data_dir == tmp_path / "data"  # relative to the config file
    assert config.settings.health_check_interval == 5
    assert config.settings.max_restarts == 4
    assert config.settings.restart_window == 120
    assert (config.settings.backoff_base_ms, config.settings.backoff_max_ms) == (200, 5000)
    assert notes["socket"] == "{data_dir}/sockets/{name}-{id}.sock"
    assert notes["health"] == "/healthz"
    assert notes["workdir"] == "apps/{name}"
    assert (notes["idle_timeout"], notes["startup_timeout"], notes["wake_timeout"]) == (30, 7, 9)
    assert (notes["request_timeout"], notes["stop_timeout"]) == (40, 3)
    assert notes["log_retention_lines"] == 50
    assert notes["env"] == {"GREETING": "hello {id} from {name}", "SOCK": "{socket}"}
    assert notes["isolation"] == "namespace"
    assert (notes["memory_limit_mb"], notes["cpu_shares"], notes["storage_quota_mb"]) == (
        256,
        512,
        1024,
    )
    assert notes["storage_persist"] is True
    assert config.instance_ids("notes") == ["alice", "bob", "vip"]
    assert config.always_on["notes"] == {"vip"}


def test_settings_defaults_are_inherited(tmp_path: Path) -> None:
    config = load(tmp_path, FULL)
    api = config.services["api"]
    assert (api["idle_timeout"], api["wake_timeout"], api["startup_timeout"]) == (600, 20, 15)
    assert api["log_retention_lines"] == 500
    assert api["stop_timeout"] == 10 and api["request_timeout"] == 30


def test_builtin_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, '[service.a]\ncommand = "python3 x.py"\n')
    a = config.services["a"]
    assert config.data_dir == tmp_path / "default-data"
    assert (a["idle_timeout"], a["wake_timeout"], a["startup_timeout"]) == (0, 30, 10)
    assert a["log_retention_lines"] == 10_000
    assert config.settings.health_check_interval == 10
    assert config.settings.max_restarts == 3
    assert config.settings.restart_window == 300


def test_upstream_example_config_loads(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [settings]
        data_dir = "./data"

        [service.api]
        command = "python3 app.py"
        health = "/health"
        isolation = "process"
        idle_timeout = 300
        startup_timeout = 10
        storage_persist = true
        memory_limit_mb = 256

        [service.api.env]
        GREETING = "hello {id}"
    """,
    )
    assert config.services["api"]["env"] == {"GREETING": "hello {id}"}
    # Upstream's `DATA_DIR = "{data_dir}/{id}"` is refused with a reason: it would make
    # tenants of two services share a directory (tests/edge/test_hostile_config.py).


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[service.a]\ncommand = "python3"\nidle_timout = 3\n',
            "service.a.idle_timout: unknown key (did you mean 'idle_timeout'?)",
        ),
        (
            "[settings]\nhealth_check_intervall = 3\n",
            "settings.health_check_intervall: unknown key (did you mean 'health_check_interval'?)",
        ),
        ('[servce.a]\ncommand = "x"\n', "servce: unknown key (did you mean 'service'?)"),
        (
            '[service.a]\ncommand = "python3"\nidle_timeout = "300"\n',
            'service.a.idle_timeout: must be a number (got "300")',
        ),
        (
            '[service.a]\ncommand = "python3"\nidle_timeout = -1\n',
            "service.a.idle_timeout: must be at least 0 (got -1)",
        ),
        (
            "[settings]\nmax_restarts = true\n",
            "settings.max_restarts: must be a whole number (got true)",
        ),
        (
            '[service.a]\ncommand = "python3"\nenv = { PORT = 8080 }\n',
            "service.a.env.PORT: must be text in quotes (got 8080)",
        ),
        (
            '[service.a]\ncommand = "python3"\nenv = { "BAD-NAME" = "x" }\n',
            "not a valid environment variable name",
        ),
        ('[service.Bad]\ncommand = "python3"\n', "invalid service name 'Bad'"),
        (
            '[service.a]\ncommand = "python3"\n[instances]\na = ["../etc"]\n',
            "instances.a.0: invalid instance id '../etc'",
        ),
        (
            '[service.a]\ncommand = "python3"\n[instances]\na = ["Alice"]\n',
            "invalid instance id 'Alice'",
        ),
        (
            '[service.a]\ncommand = "python3"\n[instances]\nb = ["x"]\n',
            "instances.b: no [service.b] is defined (defined: a)",
        ),
        ('[service.a]\ncommand = "python3"\nsocket = "/s/{port}/{id}"\n', "unknown placeholder"),
        ('[service.a]\ncommand = "python3"\nrestart = "sometimes"\n', "service.a.restart"),
        ('[service.a]\ncommand = "python3"\nlisten = "udp"\n', "service.a.listen"),
        (
            '[service.a]\ncommand = "python3"\nlisten = "tcp"\nnetwork = "none"\n',
            "service.a.listen: 'tcp' cannot work with network = 'none'",
        ),
        ('[service.a]\ncommand = "python3"\nisolation = "firecracker"\n', "VMs are not supported"),
        ('[service.a]\ncommand = "python3"\nvcpus = 2\n', "service.a.vcpus: firecracker and"),
        # Issue 17: [settings.tls] is supported, and checked (tests/tls/test_tls_config.py).
        ("[settings.tls]\nenabled = true\n", "settings.tls.acme_email: required"),
        ('[routing]\ndefault = "a"\n', "routing: [routing] is not supported"),
        ('[settings]\nport_range = "80-90"\n', "settings.port_range: must be FIRST-LAST within"),
        ("[settings]\nbackoff_base_ms = 5\n", "must be at least 10 or 0 (at once)"),
        (
            '[service.a]\ncommand = "python3"\nenv = { DATA_DIR = "{data_dir}/{id}" }\n',
            "service.a.env.DATA_DIR: set by tenement to the tenant's own directory",
        ),
        (
            '[service.a]\ncommand = "python3"\nenv = { PORT = "8080" }\n',
            "service.a.env.PORT: set by tenement",
        ),
        ('[service.a]\ncommand = "python3 {what}"\n', "unknown placeholder {what}"),
        ('[service.a]\ncommand = "python3"\nsocket = "{socket}.x"\n', "unknown placeholder"),
        ('[service.a]\ncommand = "python3"\nhealth = "/a b"\n', "must be an HTTP path"),
        ('[service.a]\ncommand = "python3"\nhealth = "health"\n', "must be an HTTP path"),
        (
            '[service.a]\ncommand = "no-such-program-xyz"\n',
            "service.a.command: 'no-such-program-xyz' not found on PATH",
        ),
        ('[service.a]\ncommand = ""\n', "service.a.command: must not be empty"),
        ('[service.a]\nhealth = "/h"\n', "service.a.command: Field required"),
        ('[service.a]\ncommand = "python3"\nisolation = "vm"\n', "service.a.isolation"),
        (
            '[service.a]\ncommand = "python3"\nisolation = "sandbox"\n',
            "service.a.isolation: isolation = sandbox (gVisor) is not supported",
        ),
        (
            '[service.a]\ncommand = "python3"\nisolation = "process"\nnetwork = "none"\n',
            "service.a.network: network = 'none' needs isolation = namespace",
        ),
        ('[service.a]\ncommand = "python3"\nnetwork = "off"\n', "service.a.network"),
        (
            '[service.a]\ncommand = "python3"\nuser = "no-such-user-xyz"\n',
            "service.a.user: no such user on this host",
        ),
        (
            '[service.a]\ncommand = "python3"\n[[service.a.mounts]]\nsource = "/nope-xyz"\n'
            'destination = "/srv"\n',
            "service.a.mounts: source '/nope-xyz' does not exist",
        ),
        (
            '[service.a]\ncommand = "python3"\n[[service.a.mounts]]\nsource = "/usr"\n'
            'destination = "../etc"\n',
            "service.a.mounts.0.destination: must be an absolute path",
        ),
        (
            '[service.a]\ncommand = "python3"\n[[service.a.mounts]]\nsource = "/usr"\n'
            'destination = "/srv"\nmode = "rw"\n',
            "service.a.mounts.0.mode: unknown key",
        ),
        (
            '[service.a]\ncommand = "python3"\nisolation = "process"\n[[service.a.mounts]]\n'
            'source = "/usr"\ndestination = "/srv"\n',
            "service.a.mounts: mounts need isolation = namespace",
        ),
        ('[service.a]\ncommand = "python3"\ncpu_max = "fast"\n', "must be a percentage"),
        ('[service.a]\ncommand = "python3"\ncpu_shares = 20000\n', "service.a.cpu_shares"),
        ('[service.a]\ncommand = "python3"\nmemory_limit_mb = 1\n', "memory_limit_mb"),
        ('[service.a]\ncommand = "python3"\npids_max = 0\n', "service.a.pids_max"),
        ('[settings]\nuid_range = "1000-2000"\n', "settings.uid_range: must lie within"),
        ('[settings]\nuid_range = "lots"\n', "settings.uid_range: must be FIRST-LAST"),
        (
            "[settings]\nbackoff_base_ms = 5000\nbackoff_max_ms = 100\n",
            "backoff_base_ms: 5000 is larger than settings.backoff_max_ms",
        ),
        ('[service.a\ncommand = "x"\n', "invalid TOML"),
    ],
)
def test_errors_name_file_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert str(tmp_path / "tenement.toml") in message
    assert expected in message


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, '[service.a]\ncommand = "python3"\nfoo = 1\nbar = 2\n')
    assert len(info.value.problems) == 2


def test_socket_over_the_limit_is_an_error(tmp_path: Path) -> None:
    text = f'[service.a]\ncommand = "python3"\nsocket = "/tmp/{"x" * 100}/{{id}}.sock"\n'
    text += '[instances]\na = ["alice"]\n'
    with pytest.raises(ConfigError, match="107-byte Unix socket limit"):
        load(tmp_path, text)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml", tmp_path)


@pytest.mark.django_db
def test_sync_is_idempotent_and_keeps_existing_state(tmp_path: Path) -> None:
    config = load(tmp_path, FULL)
    first = apply_config(config)
    assert sorted(first.created) == ["api", "notes"]
    assert sorted(first.registered) == ["api:alice", "notes:alice", "notes:bob", "notes:vip"]
    stamp = Service.objects.get(name="notes").updated_at
    Instance.objects.filter(instance_id="bob").update(desired_state="stopped")

    second = apply_config(load(tmp_path, FULL))
    assert second.created == [] and second.updated == [] and second.registered == []
    assert Service.objects.get(name="notes").updated_at == stamp  # nothing rewritten
    assert Instance.objects.get(service__name="notes", instance_id="bob").desired_state == "stopped"
    assert Instance.objects.get(service__name="notes", instance_id="vip").always_on is True
    settings = SupervisorSettings.current()
    assert (settings.max_restarts, settings.backoff_base_ms) == (4, 200)


@pytest.mark.django_db
def test_sync_updates_changed_services_and_reports_absent_ones(tmp_path: Path) -> None:
    apply_config(load(tmp_path, FULL))
    changed = (
        FULL.replace("stop_timeout = 3", "stop_timeout = 4")
        .replace(
            '[service.api]\ncommand = "python3"\n'
            'args = ["server.py", "--data", "{data_dir}/{id}"]\n',
            "",
        )
        .replace('api = ["alice"]\n', "")
    )
    report = apply_config(load(tmp_path, changed))
    assert report.updated == ["notes"]
    assert report.not_in_file == ["api"]
    assert Service.objects.get(name="notes").stop_timeout == 4
    assert Service.objects.filter(name="api").exists()  # never deleted silently


@pytest.mark.django_db
def test_boot_starts_config_instances_but_not_failed_ones(tmp_path: Path) -> None:
    config = load(tmp_path, FULL)
    apply_config(config)
    Instance.objects.update(desired_state="stopped")
    Instance.objects.filter(instance_id="bob").update(state="failed")
    assert start_config_instances(config) == 3
    assert Instance.objects.get(instance_id="bob").desired_state == "stopped"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[settings]\nmax_restarts = 99999999999999999999\n", "settings.max_restarts"),
        ("[settings]\nmax_restarts = 3000000000\n", "must be at most 2147483647"),
        ('[service.a]\ncommand = "python3"\nstop_timeout = inf\n', "service.a.stop_timeout"),
        ('[service.a]\ncommand = "python3"\nidle_timeout = nan\n', "service.a.idle_timeout"),
        ('[settings]\ndata_dir = "a\\u0000b"\n', "settings.data_dir: must not contain a NUL"),
        ('[service.a]\ncommand = "python3 \\u0000"\n', "must not contain a NUL"),
        (
            '[service.a]\ncommand = "python3"\nsocket = "{data_dir}/shared.sock"\n',
            "must contain {id} so tenants never share a socket",
        ),
        (
            '[service.a]\ncommand = "python3"\nsocket = "run/{id}.sock"\n',
            "must be an absolute path",
        ),
    ],
)
def test_hostile_values_are_config_errors_not_crashes(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert expected in str(info.value)
