"""Releases and weights: the pure split and pick, and the API in-process."""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import cache
from rest_framework.test import APIClient

from instances import tokens
from instances.ids import InstanceKey
from instances.models import Instance, Release, ReleaseChange, Service
from instances.spec import ServiceSpec
from routing.releases import (
    ACTIVE,
    DRAINING,
    FAILED,
    ReleaseInfo,
    bucket,
    effective,
    pick,
    ranges,
    shares,
    split,
)
from tests.conftest import TENANT_PYTHON, TESTAPP

# ---- the split --------------------------------------------------------------------------


def rel(name: str, weight: int, state: str = ACTIVE) -> ReleaseInfo:
    return ReleaseInfo(name=name, weight=weight, state=state)


def test_bucket_is_stable_and_spread() -> None:
    assert bucket("notes", "alice") == bucket("notes", "alice")
    counts = collections.Counter(bucket("notes", f"t{i}") for i in range(20_000))
    assert set(counts) == set(range(100))
    assert max(counts.values()) < 2 * min(counts.values())


def test_ranges_newest_first_and_the_rest_to_the_oldest() -> None:
    releases = [rel("v1", 100), rel("v2", 10), rel("v3", 5)]
    assert ranges(releases) == [("v3", 0, 5), ("v2", 5, 15), ("v1", 15, 100)]
    # Weights under 100 in all: the oldest weighted release takes the rest.
    assert shares([rel("v1", 20), rel("v2", 30)]) == {"v1": 70, "v2": 30}
    # Over 100: clipped at the tail.
    assert shares([rel("v1", 100), rel("v2", 100)]) == {"v1": 0, "v2": 100}


def test_weight_zero_draining_and_failed_cover_no_bucket() -> None:
    releases = [rel("v1", 100), rel("v2", 0), rel("v3", 50, DRAINING), rel("v4", 50, FAILED)]
    assert {split(releases, b) for b in range(100)} == {"v1"}
    assert split([rel("v1", 0)], 3) == ""


@pytest.mark.parametrize("count", [2, 3, 4])
def test_raising_a_weight_only_moves_tenants_forward(count: int) -> None:
    """For every release and every raise, no bucket moves to an older release."""
    rng = random.Random(count)
    for _ in range(200):
        weights = [100] + [rng.randrange(0, 60) for _ in range(count - 1)]
        names = [f"v{i}" for i in range(count)]
        before = [rel(n, w) for n, w in zip(names, weights, strict=True)]
        which = rng.randrange(count)
        raised = list(before)
        raised[which] = rel(names[which], min(100, weights[which] + rng.randrange(1, 40)))
        for b in range(100):
            old, new = names.index(split(before, b)), names.index(split(raised, b))
            assert new >= old, (weights, which, b)


def test_effective_pin_fallback_and_skip() -> None:
    releases = [rel("v1", 100), rel("v2", 100), rel("v3", 0)]
    assert effective(releases, 42) == "v2"
    assert effective(releases, 42, pin="v3") == "v3"  # pins win, even at weight 0
    assert effective(releases, 42, pin="gone") == "v2"
    # v2 failed to start for this tenant: back to where it last ran healthy ...
    assert effective(releases, 42, last_good="v1", skip=["v2"]) == "v1"
    # ... or, never having run, the split over what is left.
    assert effective(releases, 42, skip=["v2"]) == "v1"
    assert effective([], 42) == ""


def test_release_overrides_apply_on_top_of_the_service() -> None:
    spec = ServiceSpec(
        name="s", command="app --x", data_dir="/d", health="/health", env=(("A", "1"),)
    )
    same = ReleaseInfo("v1").apply(spec)
    assert same == spec
    v2 = ReleaseInfo("v2", command="new --y", env=(("B", "2"),), health="/ready").apply(spec)
    assert (v2.command, v2.args, v2.health) == ("new --y", (), "/ready")
    assert dict(v2.env) == {"A": "1", "B": "2"}
    v3 = ReleaseInfo("v3", args=("--z",)).apply(spec)
    assert (v3.command, v3.args) == ("app --x", ("--z",))


def test_pick_follows_weights_within_two_points_and_never_weight_zero() -> None:
    rng = random.Random(7)
    counts = collections.Counter(pick([("a", 70), ("b", 30), ("c", 0)], rng) for _ in range(10_000))
    assert counts["c"] == 0
    assert abs(counts["a"] / 100 - 70) <= 2 and abs(counts["b"] / 100 - 30) <= 2
    assert pick([("a", 0)]) is None and pick([]) is None


# ---- the API ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_rate_limits() -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def service(tmp_path: Path, settings: Any) -> Service:
    settings.TENEMENT_DATA_DIR = tmp_path
    service = Service.objects.create(
        name="notes", command=f"{TENANT_PYTHON} {TESTAPP}", data_dir=str(tmp_path)
    )
    for i in range(40):
        Instance.objects.create(service=service, instance_id=f"t{i}")
    return service


_names = itertools.count()


def client(scope: str = "admin", tenant: str = "") -> APIClient:
    api = APIClient()
    minted = tokens.mint(f"ops-{next(_names)}", scope, tenant)
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {minted.secret}")
    return api


def ok(response: Any) -> bool:
    assert 200 <= response.status_code < 300, response.content
    return True


def listing(api: APIClient) -> dict[str, dict[str, Any]]:
    response = api.get("/api/services/notes/releases")
    assert response.status_code == 200, response.content
    return {r["name"]: r for r in response.json()["releases"]}


@pytest.mark.django_db
def test_create_weight_switch_rollback_retire_with_audit(service: Service) -> None:
    api = client()
    response = api.post(
        "/api/services/notes/releases",
        {"name": "v2", "env": {"RELEASE": "v2"}, "health": "/health"},
        format="json",
    )
    assert response.status_code == 201, response.content
    rows = listing(api)
    # The service's own definition became v1, with every tenant; v2 starts with none.
    assert rows["v1"]["weight"] == 100 and rows["v1"]["tenants"] == 40
    assert rows["v2"]["weight"] == 0 and rows["v2"]["tenants"] == 0

    preview = api.get("/api/services/notes/releases/v2/preview?weight=25").json()
    assert preview["moving"] == preview["onto"]
    moving = preview["moving"]
    assert ok(api.put("/api/services/notes/releases/v2/weight", {"weight": 25}, format="json"))
    rows = listing(api)
    assert rows["v2"]["share"] == 25 and rows["v2"]["tenants"] == moving
    assert rows["v1"]["tenants"] == 40 - moving

    assert ok(api.post("/api/services/notes/releases/v2/switch"))
    rows = listing(api)
    assert (rows["v1"]["state"], rows["v1"]["weight"]) == ("draining", 0)
    assert rows["v2"]["tenants"] == 40
    assert ok(api.post("/api/services/notes/rollback"))
    rows = listing(api)
    assert rows["v1"]["tenants"] == 40 and rows["v2"]["weight"] == 0

    assert ok(api.post("/api/services/notes/releases/v2/retire"))
    assert Release.objects.get(name="v2").state == "retired"
    kinds = [c["kind"] for c in api.get("/api/releases/changes?service=notes").json()]
    assert kinds == ["retire", "rollback", "switch", "weight", "create", "create"]
    change = ReleaseChange.objects.filter(kind="weight").get()
    assert (change.from_value, change.to_value) == ("0", "25")
    assert change.actor.startswith("token:ops-")


@pytest.mark.django_db
def test_bad_input_is_refused_and_changes_nothing(service: Service) -> None:
    api = client()
    assert ok(api.post("/api/services/notes/releases", {"name": "v2"}, format="json"))
    for body in (
        {"name": "Bad_Name"},
        {"name": "v3", "nonsense": 1},
        {"name": "v3", "health": "no-slash"},
        {"name": "v3", "env": {"1BAD": "x"}},
        {"name": "v3", "weight": 101},
        {"name": "v2"},
    ):
        response = api.post("/api/services/notes/releases", body, format="json")
        assert response.status_code in (400, 409), (body, response.content)
        assert "error" in response.json()
    put = api.put
    assert (
        put("/api/services/notes/releases/v2/weight", {"weight": -1}, format="json").status_code
        == 400
    )
    assert (
        put("/api/services/notes/releases/v9/weight", {"weight": 5}, format="json").status_code
        == 404
    )
    # The only weighted release cannot go to 0: tenants would have nowhere to run.
    response = put("/api/services/notes/releases/v1/weight", {"weight": 0}, format="json")
    assert response.status_code == 409
    assert api.post("/api/services/notes/releases/v1/retire").status_code == 409
    assert set(Release.objects.values_list("name", "weight")) == {("v1", 100), ("v2", 0)}
    assert api.post("/api/services/notes/rollback").status_code == 409


@pytest.mark.django_db
def test_pins_win_and_tenant_tokens_cannot_touch_releases(service: Service) -> None:
    api = client()
    api.post("/api/services/notes/releases", {"name": "v2"}, format="json")
    response = api.put("/api/instances/notes:t3/release", {"release": "v2"}, format="json")
    assert response.status_code == 200 and response.json()["release"] == "v2"
    shown = api.get("/api/instances/notes:t3/").json()
    assert (shown["release"], shown["weight"], shown["last_release"]) == ("v2", 100, "")
    assert listing(api)["v2"]["tenants"] == 1 and listing(api)["v2"]["pinned"] == 1
    assert (
        api.put("/api/instances/notes:t3/release", {"release": "nope"}, format="json").status_code
        == 404
    )
    tenant = client("write", tenant="t3")
    assert (
        tenant.put("/api/instances/notes:t3/release", {"release": ""}, format="json").status_code
        == 403
    )
    assert tenant.post("/api/services/notes/releases/v2/switch").status_code == 403
    assert (
        client("write")
        .post("/api/services/notes/releases", {"name": "v3"}, format="json")
        .status_code
        == 403
    )
    assert ok(api.put("/api/instances/notes:t3/release", {"release": ""}, format="json"))
    assert Instance.objects.get(instance_id="t3").release == ""


@pytest.mark.django_db
def test_upstream_weight_and_route_answer_upstreams_json(service: Service) -> None:
    api = client("write")
    response = api.put("/api/instances/notes:t1/weight", {"weight": 0}, format="json")
    assert response.json() == {"instance": "notes:t1", "weight": 0}
    assert Instance.objects.get(instance_id="t1").weight == 0
    response = api.post("/api/route", {"process": "notes", "from": "t2", "to": "t1"}, format="json")
    assert response.json() == {
        "from_instance": "notes:t2",
        "to_instance": "notes:t1",
        "from_weight": 0,
        "to_weight": 100,
    }
    weights = dict(
        Instance.objects.filter(instance_id__in=["t1", "t2"]).values_list("instance_id", "weight")
    )
    assert weights == {"t1": 100, "t2": 0}
    assert (
        api.put("/api/instances/notes:zz/weight", {"weight": 5}, format="json").status_code == 404
    )
    assert (
        api.put("/api/instances/notes:t1/weight", {"weight": 300}, format="json").status_code == 400
    )
    tenant = client("write", tenant="t1")
    assert ok(tenant.put("/api/instances/notes:t1/weight", {"weight": 5}, format="json"))
    assert (
        tenant.put("/api/instances/notes:t2/weight", {"weight": 5}, format="json").status_code
        == 403
    )
    body = {"process": "notes", "version": "t1", "weight": 100, "timeout": 30}
    assert tenant.post("/api/deploy", body, format="json").status_code == 403


# ---- [instances] pins ------------------------------------------------------------------------


@pytest.mark.django_db
def test_instances_entries_pin_tenants_to_existing_releases(tmp_path: Path) -> None:
    from instances.config import ConfigError, load_config
    from instances.sync import apply_config
    from routing import operations as ops

    path = tmp_path / "tenement.toml"
    path.write_text(
        f'[service.notes]\ncommand = "{TENANT_PYTHON} {TESTAPP}"\n\n'
        '[instances]\nnotes = ["alice@v2", "bob"]\n'
    )
    config = load_config(path, tmp_path)
    assert config.instance_ids("notes") == ["alice", "bob"]
    assert config.pins["notes"] == {"alice": "v2"}
    # No release v2 yet: refused, and nothing of the file is applied.
    with pytest.raises(ConfigError, match="release 'v2' does not exist"):
        apply_config(config)
    assert not Instance.objects.exists()
    path.write_text(path.read_text().replace('"alice@v2", ', ""))
    apply_config(load_config(path, tmp_path))
    ops.create("notes", {"name": "v2"}, "op")
    ops.pin(InstanceKey("notes", "bob"), "v2", "op")
    path.write_text(path.read_text().replace('["bob"]', '["alice@v2", "bob"]'))
    apply_config(load_config(path, tmp_path))
    pins = dict(Instance.objects.values_list("instance_id", "release"))
    assert pins == {"alice": "v2", "bob": "v2"}  # bob's API pin is left alone
    assert ReleaseChange.objects.filter(kind="pin", actor="config", instance="alice").exists()
    for bad in ('"alice@"', '"alice@V2"', '"@v2"'):
        path.write_text(path.read_text().replace('"alice@v2"', bad))
        with pytest.raises(ConfigError):
            load_config(path, tmp_path)
        path.write_text(path.read_text().replace(bad, '"alice@v2"'))


# ---- the weighted host's choice ---------------------------------------------------------------


class Snapshot:
    """What proxy.weighted.choose reads of the proxy's state: the table and failed keys."""

    def __init__(self, weighted: dict[str, tuple[tuple[str, int], ...]], failed: set) -> None:
        from routing.table import RoutingTable

        self.table = RoutingTable(weighted=weighted)
        self.failed = failed


def test_weighted_choice_skips_failed_and_sticks_with_the_cookie(settings: Any) -> None:
    from proxy.weighted import choose, sticky_send

    state = Snapshot({"api": (("v1", 50), ("v2", 50))}, {InstanceKey("api", "v1")})
    scope: dict[str, Any] = {"headers": []}
    settings.TENEMENT_STICKY_COOKIE = ""
    assert {choose(state, "api", scope) for _ in range(50)} == {("v2", None)}
    assert choose(state, "nosuch", scope) == (None, None)
    settings.TENEMENT_STICKY_COOKIE = "ten_sticky"
    state.failed = set()
    chosen, cookie = choose(state, "api", scope)
    assert chosen == cookie and chosen in ("v1", "v2")
    held = {"headers": [(b"cookie", b"a=b; ten_sticky=v1")]}
    assert {choose(state, "api", held) for _ in range(50)} == {("v1", None)}
    # A held instance that lost its weight (or failed) is not kept.
    state.table = Snapshot({"api": (("v2", 100),)}, set()).table
    assert choose(state, "api", held) == ("v2", "v2")
    assert choose(state, "api", {"headers": [(b"cookie", b"\xff;;=")]})[0] == "v2"

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    wrapped = sticky_send(send, "v2")
    asyncio.run(wrapped({"type": "http.response.start", "status": 200, "headers": []}))
    asyncio.run(wrapped({"type": "http.response.body", "body": b"x"}))
    assert (b"set-cookie", b"ten_sticky=v2; Path=/; HttpOnly; SameSite=Lax") in sent[0]["headers"]
    assert "headers" not in sent[1]
