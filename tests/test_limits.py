"""Storage quota, storage_persist, fair log capture, uid allocation and cgroup helpers."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.test import override_settings

from instances.models import Event
from instances.spec import ServiceSpec
from instances.supervisor import cgroups, isolation
from instances.supervisor.isolation import IsolationUnavailable
from instances.supervisor.logs import FLUSH_BATCH, MAX_BUFFERED, LogCollector
from tests.conftest import TENANT_PYTHON
from tests.test_supervisor import KEY, make_service, register, supervising, wait_state

pytestmark = [pytest.mark.timeout(60)]


def test_uids_are_stable_and_never_shared() -> None:
    uids = range(200_000, 200_010)
    assert isolation.allocate_uid(3, uids, set()) == 200_002
    assert isolation.allocate_uid(3, uids, {200_002}) == 200_003
    assert isolation.allocate_uid(13, uids, set()) == 200_002  # wraps round the range
    with pytest.raises(IsolationUnavailable, match="used up"):
        isolation.allocate_uid(1, range(5, 7), {5, 6})


def test_cpu_max_and_weights() -> None:
    assert cgroups.cpu_quota_us("50%") == 50_000
    assert cgroups.cpu_quota_us("250%") == 250_000
    assert cgroups.missing(ServiceSpec(name="a", command="x", data_dir="/d"), None) is None
    lacking = cgroups.missing(
        ServiceSpec(name="a", command="x", data_dir="/d", memory_limit_mb=64, pids_max=5), None
    )
    assert lacking and "memory_limit_mb needs the memory controller" in lacking
    assert "pids_max needs the pids controller" in lacking


def test_sandbox_exit_codes_read_as_signals() -> None:
    ns = ServiceSpec(name="a", command="x", data_dir="/d", isolation="namespace")
    proc = ServiceSpec(name="a", command="x", data_dir="/d", isolation="process")
    assert isolation.exit_code(137, ns) == -9 and isolation.exit_code(3, ns) == 3
    assert isolation.exit_code(137, proc) == 137


async def test_a_flooder_never_costs_a_quiet_tenant_its_lines() -> None:
    logs = LogCollector()
    for i in range(MAX_BUFFERED):  # two flooders fill the shared buffer...
        logs.add(1 + i % 2, "stdout", "flood")
    for i in range(500):  # ... and the quiet tenant logs in between
        logs.add(3, "stdout", f"quiet {i}")
        logs.add(1, "stdout", "flood")
        logs.add(2, "stdout", "flood")
    kept = [line.text for line in logs.buffer if line.instance_pk == 3]
    assert len(kept) == 500 and 3 not in logs.dropped
    assert logs.dropped[1] == logs.dropped[2] == 500
    assert len(logs.buffer) <= MAX_BUFFERED + 500 + FLUSH_BATCH


@pytest.mark.django_db(transaction=True)
@override_settings(TENEMENT_STORAGE_CHECK_SECONDS=0.05)
async def test_storage_quota_events_at_80_and_100_percent(short_tmp: Path) -> None:
    service = await sync_to_async(make_service)(short_tmp, storage_quota_mb=1)
    await sync_to_async(register)(service, "alice", desired="running")
    async with supervising(short_tmp) as sup:
        rt = sup.runtimes[KEY]
        await wait_state(rt, "running")
        data = rt.spec.instance_dir("alice")

        async def kinds() -> list[str]:
            return await sync_to_async(
                lambda: list(
                    Event.objects.filter(kind__startswith="storage")
                    .values_list("kind", flat=True)
                    .order_by("id")
                )
            )()

        (data / "a").write_bytes(os.urandom(900 * 1024))
        async with asyncio.timeout(10):
            while "storage_high" not in await kinds():
                await asyncio.sleep(0.05)
        (data / "b").write_bytes(os.urandom(300 * 1024))
        async with asyncio.timeout(10):
            while "storage_full" not in await kinds():
                await asyncio.sleep(0.05)
        assert await kinds() == ["storage_high", "storage_full"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("persist", [True, False])
async def test_storage_persist_false_wipes_the_data_dir_on_stop(
    short_tmp: Path, persist: bool
) -> None:
    service = await sync_to_async(make_service)(short_tmp, storage_persist=persist)
    await sync_to_async(register)(service, "alice", desired="running")
    async with supervising(short_tmp) as sup:
        rt = sup.runtimes[KEY]
        await wait_state(rt, "running")
        marker = rt.spec.instance_dir("alice") / "kept"
        marker.write_text("x")
        task = sup.request_stop(rt, "manual")
        assert task is not None
        await task
        assert rt.state == "stopped"
        assert marker.exists() is persist


def host(**kw: object) -> isolation.Host:
    base = {"root": True, "bwrap": "/usr/bin/bwrap", "setpriv": "/usr/bin/setpriv"}
    return isolation.Host(**{**base, "env": "/usr/bin/env", "cgroups": None, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spec_fields,host_fields,expected",
    [
        ({"isolation": "namespace"}, {"bwrap": None}, "needs bubblewrap"),
        ({"isolation": "sandbox"}, {}, "sandbox (gVisor) is not supported"),
        ({"memory_limit_mb": 64}, {}, "memory_limit_mb needs the memory controller"),
        ({"isolation": "process"}, {"setpriv": None}, "needs setpriv"),
        ({"user": "no-such-user-xyz"}, {}, "no such user"),
    ],
)
def test_what_the_host_cannot_provide_is_refused_by_name(
    spec_fields: dict, host_fields: dict, expected: str
) -> None:
    spec = ServiceSpec(name="a", command="x", data_dir="/d", **spec_fields)
    h = host(**host_fields)
    with pytest.raises(IsolationUnavailable, match=re.escape(expected)):
        isolation.check(spec, h)
        isolation.identity_for(spec, 200_000, h)


def test_process_isolation_without_root_warns_what_is_open() -> None:
    spec = ServiceSpec(name="a", command="x", data_dir="/d", isolation="process")
    [warning] = isolation.warnings_for(spec, host(root=False))
    assert "can read its database, secret key and config" in warning
    assert isolation.warnings_for(spec, host()) == []
    assert isolation.identity_for(spec, None, host(root=False)).uid is None


def test_sandbox_hides_the_control_plane_wherever_it_lives(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "metrics.sock").touch()
    monkeypatch.setattr(isolation, "control_plane_dirs", lambda: (str(state), "/srv/t/x"))
    monkeypatch.setattr(isolation, "_masked", set())
    isolation.mask(str(state / "metrics.sock"))
    spec = ServiceSpec(name="notes", command="x", data_dir="/srv/t")
    opts = isolation.bwrap_options(spec, "alice", Path("/srv/t/notes/alice"), host())
    tmpfs = [opts[i + 1] for i, o in enumerate(opts) if o == "--tmpfs"]
    # The tenants' root and the state folder; /srv/t/x is inside /srv/t already.
    assert tmpfs == ["/tmp", "/srv/t", str(state)]
    masked = [
        opts[i + 2] for i, o in enumerate(opts) if o == "--ro-bind" and opts[i + 1] == "/dev/null"
    ]
    assert masked == [str(state / "metrics.sock")]
    binds = [(opts[i + 1], opts[i + 2]) for i, o in enumerate(opts) if o == "--bind"]
    assert binds == [
        ("/srv/t/notes/alice", "/srv/t/notes/alice"),
        ("/srv/t/run/notes-alice", "/srv/t/run/notes-alice"),
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to an unprivileged user to test")
@pytest.mark.timeout(30)
def test_without_root_a_namespace_still_hides_the_data_root(short_tmp: Path) -> None:
    """A supervisor that is not root (simulated: the launch command built for a non-root
    host, run as `nobody`) sandboxes through a user namespace: the tenant shares its uid,
    yet sees neither the database, the secret key nor another tenant."""
    import subprocess

    nobody = 65534
    root = short_tmp / "r"
    data = root / "data"
    (data / "notes" / "bob").mkdir(parents=True)
    (data / "secret_key").write_text("s3cret")
    (data / "notes" / "bob" / "diary").write_text("bob's")
    for path in [root, *root.rglob("*")]:
        os.chown(path, nobody, nobody)
    spec = ServiceSpec(name="notes", command="x", data_dir=str(data), isolation="namespace")
    h = host(root=False)
    ident = isolation.identity_for(spec, None, h)
    own = spec.instance_dir("alice")
    own.mkdir(parents=True)
    sock_dir = Path(spec.socket_path("alice")).parent
    sock_dir.mkdir(parents=True)
    for path in (own, sock_dir, sock_dir.parent):
        os.chown(path, nobody, nobody)
    script = (
        "import os,sys; d=sys.argv[1]; print(sorted(os.listdir(d)));"
        "print(os.path.exists(d+'/secret_key'), os.path.exists(d+'/notes/bob'));"
        "open(d+'/notes/alice/mine','w').write('x'); print(os.getuid())"
    )
    argv = isolation.launch_argv(
        spec,
        "alice",
        [TENANT_PYTHON, "-c", script, str(data)],
        own,
        ident,
        h,
    )
    out = subprocess.run(
        ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    listing, hidden, uid = out.stdout.splitlines()
    assert "secret_key" not in listing and listing == "['notes', 'run']"
    assert hidden == "False False"  # neither the secret nor bob's folder exists in there
    assert (own / "mine").exists() and uid == str(nobody)


def test_code_under_tmp_stays_visible_but_never_the_data_root(short_tmp: Path) -> None:
    """A checkout under /tmp (CI clones there) would vanish behind the private /tmp: the
    folders the command names are bound back read-only, before the data root is hidden."""
    app = short_tmp / "code" / "app.py"
    app.parent.mkdir()
    app.write_text("print('hi')")
    data = short_tmp / "data"
    spec = ServiceSpec(name="a", command="x", data_dir=str(data), config_dir=str(short_tmp))
    env = {"PYTHONPATH": f"{short_tmp / 'code'}:/usr/lib/nothing", "HOME": "/nonexistent"}
    folders = isolation.code_folders(spec, ["/usr/bin/python3", str(app)], env)
    # The config's folder also holds the data root, and is passable (0711): it comes back,
    # with the data root hidden again after it.
    assert folders == [str(short_tmp)]
    short_tmp.chmod(0o700)  # a private folder above the data root would lock tenants out
    assert isolation.code_folders(spec, ["/usr/bin/python3", str(app)], env) == [
        str(short_tmp / "code")
    ]
    short_tmp.chmod(0o711)
    opts = isolation.bwrap_options(spec, "alice", data / "a" / "alice", host(), folders)
    code_at = opts.index(str(short_tmp))
    assert opts[code_at - 1] == "--ro-bind"
    assert code_at < opts.index(str(data)), "the data root must be hidden after, not before"
    assert (
        isolation.code_folders(spec.__class__(name="a", command="x", data_dir="/d"), [], {}) == []
    )


def test_code_named_in_an_assignment_argument_stays_visible(short_tmp: Path) -> None:
    """`env PYTHONPATH=/tmp/x/site-packages python3 app.py` names its packages in an
    argument's value: bound back too (a fresh clone under /tmp failed this way)."""
    packages = short_tmp / "venv" / "site-packages"
    packages.mkdir(parents=True)
    spec = ServiceSpec(name="a", command="x", data_dir="/d")
    argv = ["/usr/bin/env", f"PYTHONPATH={packages}:/usr/lib/nothing", "/usr/bin/python3"]
    assert isolation.code_folders(spec, argv, {}) == [str(packages)]
    assert isolation.code_folders(spec, [f"--app-dir={packages}"], {}) == [str(packages)]
