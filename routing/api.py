"""The API of releases and weights: upstream's weight/deploy/route, and our releases.

Upstream's paths answer with upstream's JSON (so its `ten` binary and scripts work):
  PUT  /api/instances/{service:id}/weight   {weight}          -> {instance, weight}
  POST /api/deploy   {process, version, weight=100, timeout=30}
                     -> {instance, socket, weight, status}
  POST /api/route    {process, from, to}   -> {from_instance, to_instance, from_weight, to_weight}
Ours live under /api/services/{service}/releases/ and /api/instances/{key}/release.
Views are thin: the work is in routing/operations.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from django.urls import re_path
from drf_spectacular.utils import extend_schema
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from instances import operations as instance_ops
from instances.api.auth import tenant_of, token_of
from instances.api.errors import Conflict
from instances.api.params import bounded_int, json_object
from instances.ids import InstanceKey, InvalidName, check_label, parse_key
from instances.models import Instance, ReleaseChange
from instances.spec import ServiceSpec
from routing import operations as ops

T = TypeVar("T")
KEY = r"(?P<key>[a-z0-9-]+:[a-z0-9-]+)"
NAME = r"(?P<service>[a-z0-9-]+)"
RELEASE = r"(?P<release>[a-z0-9-]+)"
DEPLOY_MAX_TIMEOUT = 600


def actor(request: Request) -> str:
    """Who made a change, for the audit trail: the token's name or the user's."""
    token = token_of(request)
    if token is not None:
        return f"token:{token.name}"
    return getattr(request.user, "username", "") or "anonymous"


def run(work: Callable[[], T]) -> T:
    """An operation, its refusals turned into the API's error answers."""
    try:
        return work()
    except ops.NotFoundError as e:
        raise NotFound(str(e)) from None
    except ops.ConflictError as e:
        raise Conflict(str(e)) from None
    except (ops.ReleaseError, InvalidName) as e:
        raise ValidationError({"non_field_errors": [str(e)]}) from None


def whole_number(data: dict[str, Any], field: str, default: int | None = None) -> int:
    value = data.get(field, default)
    if value is None:
        raise ValidationError({field: ["this field is required"]})
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError({field: [f"must be a whole number (got {value!r})"]})
    return value


def untenanted(request: Request, what: str) -> None:
    """Releases and upstream's deploy/route act on every tenant of a service."""
    if tenant_of(request):
        raise PermissionDenied(f"{what} needs a token that is not limited to one tenant")


def key_of(raw: str) -> InstanceKey:
    try:
        return parse_key(raw)
    except InvalidName as e:
        raise ValidationError({"key": [str(e)]}) from None


# ---- upstream's endpoints -----------------------------------------------------------------


class InstanceWeightView(APIView):
    @extend_schema(request=dict, responses=dict)
    def put(self, request: Request, key: str) -> Response:
        parsed = key_of(key)
        tenant = tenant_of(request)
        if tenant and parsed.instance_id != tenant:
            raise PermissionDenied(f"this token may only act on tenant {tenant!r}")
        weight = whole_number(json_object(request), "weight")
        run(lambda: ops.set_instance_weight(parsed, weight, actor(request)))
        return Response({"instance": str(parsed), "weight": weight})


class DeployView(APIView):
    """Start `process:version` with a weight and wait until it is healthy."""

    @extend_schema(request=dict, responses=dict)
    def post(self, request: Request) -> Response:
        untenanted(request, "deploy")
        data = json_object(request)
        try:
            key = InstanceKey(
                check_label(data.get("process"), "process (service) name"),
                check_label(data.get("version"), "version (instance id)"),
            )
        except InvalidName as e:
            raise ValidationError({"non_field_errors": [str(e)]}) from None
        weight = whole_number(data, "weight", 100)
        timeout = whole_number(data, "timeout", 30)
        if not 1 <= timeout <= DEPLOY_MAX_TIMEOUT:
            raise ValidationError({"timeout": [f"must be 1 to {DEPLOY_MAX_TIMEOUT} seconds"]})
        who = actor(request)
        instance = run(lambda: self.start(key, weight, who))
        instance = instance_ops.wait_for_states(instance.pk, {"running", "failed"}, timeout)
        if instance.state != Instance.State.RUNNING:
            # Never left serving half-deployed: no weight, and stopped.
            run(lambda: ops.set_instance_weight(key, 0, who))
            instance_ops.request_stop(key)
            why = instance.last_error or f"not healthy within {timeout}s"
            raise Conflict(f"deploy of {key} failed: {why}; stopped, weight 0")
        socket = ServiceSpec.from_model(instance.service).socket_path(key.instance_id)
        body = {"instance": str(key), "socket": socket, "weight": weight, "status": "healthy"}
        return Response(body)

    @staticmethod
    def start(key: InstanceKey, weight: int, who: str) -> Instance:
        try:
            instance_ops.register(key)
        except instance_ops.OperationError as e:
            raise ops.NotFoundError(str(e)) from None
        ops.set_instance_weight(key, weight, who)
        ops.audit(key.service, "deploy", who, instance=key.instance_id, to_value=f"weight {weight}")
        instance = instance_ops.request_start(key)
        ops.announce()  # the supervisor starts it now, not at its next sync
        return instance


class RouteView(APIView):
    """Upstream's blue-green swap: `from` gets weight 0, `to` gets 100."""

    @extend_schema(request=dict, responses=dict)
    def post(self, request: Request) -> Response:
        untenanted(request, "route")
        data = json_object(request)
        try:
            service = check_label(data.get("process"), "process (service) name")
            source = check_label(data.get("from"), "from (instance id)")
            dest = check_label(data.get("to"), "to (instance id)")
        except InvalidName as e:
            raise ValidationError({"non_field_errors": [str(e)]}) from None
        run(lambda: ops.route(service, source, dest, actor(request)))
        return Response(
            {
                "from_instance": f"{service}:{source}",
                "to_instance": f"{service}:{dest}",
                "from_weight": 0,
                "to_weight": 100,
            }
        )


# ---- releases ------------------------------------------------------------------------------


class ReleasesView(APIView):
    def get_permissions(self) -> list[Any]:
        # Creating one defines a command that runs for tenants: like defining a service.
        self.required_scope = "admin" if self.request.method == "POST" else None
        return super().get_permissions()

    @extend_schema(responses=dict)
    def get(self, request: Request, service: str) -> Response:
        found = run(lambda: ops.get_service(service))
        return Response({"service": service, "releases": ops.summary(found)})

    @extend_schema(request=dict, responses={201: dict})
    def post(self, request: Request, service: str) -> Response:
        untenanted(request, "creating a release")
        data = json_object(request)
        release = run(lambda: ops.create(service, data, actor(request)))
        return Response({"service": service, "name": release.name}, status=201)


class ReleaseWeightView(APIView):
    @extend_schema(request=dict, responses=dict)
    def put(self, request: Request, service: str, release: str) -> Response:
        untenanted(request, "a release weight")
        weight = whole_number(json_object(request), "weight")
        run(lambda: ops.set_weight(service, release, weight, actor(request)))
        return self.listing(service)

    post = put

    @staticmethod
    def listing(service: str) -> Response:
        found = run(lambda: ops.get_service(service))
        return Response({"service": service, "releases": ops.summary(found)})


class ReleaseActionView(APIView):
    """POST …/releases/{name}/switch | retire | smoke."""

    action = ""

    @extend_schema(request=dict, responses=dict)
    def post(self, request: Request, service: str, release: str) -> Response:
        untenanted(request, f"a release {self.action}")
        who = actor(request)
        if self.action == "switch":
            run(lambda: ops.switch(service, release, who))
        elif self.action == "retire":
            run(lambda: ops.retire(service, release, who))
        else:
            data = json_object(request)
            tenant = data.get("tenant")
            timeout = whole_number(data, "timeout", 30)
            if not 1 <= timeout <= DEPLOY_MAX_TIMEOUT:
                raise ValidationError({"timeout": [f"must be 1 to {DEPLOY_MAX_TIMEOUT} seconds"]})
            run(lambda: ops.smoke(service, release, tenant, timeout, who))
        return ReleaseWeightView.listing(service)


class RollbackView(APIView):
    @extend_schema(request=None, responses=dict)
    def post(self, request: Request, service: str) -> Response:
        untenanted(request, "a rollback")
        run(lambda: ops.rollback(service, actor(request)))
        return ReleaseWeightView.listing(service)


class PreviewView(APIView):
    @extend_schema(responses=dict)
    def get(self, request: Request, service: str, release: str) -> Response:
        raw = request.query_params.get("weight", "")
        if not raw.isdigit() or not 0 <= int(raw) <= 100:
            raise ValidationError({"weight": ["must be a whole number from 0 to 100"]})
        return Response(run(lambda: ops.preview(service, release, int(raw))))


class ChangesView(APIView):
    @extend_schema(responses={200: {"type": "array", "items": {"type": "object"}}})
    def get(self, request: Request) -> Response:
        limit = bounded_int(request.query_params.get("limit"), 100, 1000, "limit")
        rows = ReleaseChange.objects.all()
        if service := request.query_params.get("service"):
            rows = rows.filter(service=service)
        if tenant := tenant_of(request):
            rows = rows.filter(instance=tenant)
        return Response([change_json(c) for c in rows[:limit]])


def change_json(change: ReleaseChange) -> dict[str, Any]:
    return {
        "time": change.time.isoformat(),
        "service": change.service,
        "release": change.release,
        "instance": change.instance,
        "kind": change.kind,
        "actor": change.actor,
        "from": change.from_value,
        "to": change.to_value,
        "message": change.message,
    }


class PinView(APIView):
    @extend_schema(request=dict, responses=dict)
    def put(self, request: Request, key: str) -> Response:
        untenanted(request, "pinning a release")
        parsed = key_of(key)
        name = json_object(request).get("release") or ""
        if not isinstance(name, str):
            raise ValidationError({"release": ["must be a release name, or empty to unpin"]})
        instance = run(lambda: ops.pin(parsed, name, actor(request)))
        return Response({"instance": str(parsed), "release": instance.release})


urlpatterns = [
    re_path(rf"^instances/{KEY}/weight/?$", InstanceWeightView.as_view()),
    re_path(rf"^instances/{KEY}/release/?$", PinView.as_view()),
    re_path(r"^deploy/?$", DeployView.as_view()),
    re_path(r"^route/?$", RouteView.as_view()),
    re_path(r"^releases/changes/?$", ChangesView.as_view()),
    re_path(rf"^services/{NAME}/releases/?$", ReleasesView.as_view()),
    re_path(rf"^services/{NAME}/rollback/?$", RollbackView.as_view()),
    re_path(rf"^services/{NAME}/releases/{RELEASE}/weight/?$", ReleaseWeightView.as_view()),
    re_path(rf"^services/{NAME}/releases/{RELEASE}/preview/?$", PreviewView.as_view()),
    *(
        re_path(
            rf"^services/{NAME}/releases/{RELEASE}/{action}/?$",
            ReleaseActionView.as_view(action=action),
        )
        for action in ("switch", "retire", "smoke")
    ),
]
