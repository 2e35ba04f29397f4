"""API views: thin; the work is in instances.operations, instances.config, instances.tokens."""

from __future__ import annotations

import shutil
import time
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from instances import operations as ops
from instances import tokens
from instances.api import serializers as s
from instances.api.auth import tenant_of, token_of
from instances.api.errors import Conflict, Unavailable
from instances.api.params import bounded_int, int_param, json_object, known_params
from instances.api.schema import service_body
from instances.config import ConfigError, field_errors, validate_service
from instances.ids import InvalidName, parse_key
from instances.models import ApiToken, Event, Instance, Service
from instances.spec import ServiceSpec
from instances.supervisor import storage

KEY_REGEX = r"[a-z0-9-]+:[a-z0-9-]+"
PURGE_WAIT_SLACK = 5.0
SPAWN_WAIT = 10.0
LIST_PARAMS = frozenset({"service", "state", "all"})
# Upstream's list shows the instances it has a process for; ours adds sleeping ones on ask.
ASLEEP = (Instance.State.STOPPED,)
TRUE = ("1", "true", "yes")


class ServiceViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    """Service definitions: the same fields and rules as `[service.NAME]` in tenement.toml."""

    queryset = Service.objects.all()
    serializer_class = s.ServiceSerializer
    lookup_field = "name"
    lookup_value_regex = "[a-z0-9-]+"

    def get_permissions(self) -> list[Any]:
        # Defining services is an admin matter: a service runs commands for every tenant.
        self.required_scope = None if self.action in ("list", "retrieve") else "admin"
        return super().get_permissions()

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        known_params(request, set())
        return super().list(request, *args, **kwargs)

    def get_serializer_context(self) -> dict[str, Any]:
        token = token_of(self.request)
        is_admin = token.scope == "admin" if token else self.request.user.is_staff
        return {**super().get_serializer_context(), "show_env": is_admin}

    @extend_schema(request=service_body(with_name=True), responses={201: s.ServiceSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = json_object(request)
        name = str(data.pop("name", ""))
        fields = self.validated(name, data)
        conflict = Conflict(f"a service named {name!r} already exists")
        if Service.objects.filter(name=name).exists():
            raise conflict
        try:
            with transaction.atomic():
                service = Service.objects.create(name=name, **fields)
        except IntegrityError:  # created by someone else just now
            raise conflict from None
        return Response(self.get_serializer(service).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=service_body(with_name=False), responses=s.ServiceSerializer)
    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        service = self.get_object()
        data = json_object(request)
        if kwargs.get("partial"):
            current = {
                f: getattr(service, f) for f in s.WRITABLE_SERVICE_FIELDS if getattr(service, f)
            }
            data = {**current, **data}
        fields = self.validated(service.name, data)
        for key, value in fields.items():
            setattr(service, key, value)
        service.save()  # bumps updated_at: the supervisor applies it to the next start
        return Response(self.get_serializer(service).data)

    @extend_schema(
        request=service_body(with_name=False, partial=True), responses=s.ServiceSerializer
    )
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().partial_update(request, *args, **kwargs)

    def validated(self, name: str, data: dict[str, Any]) -> dict[str, Any]:
        for key in ("source", "created_at", "updated_at"):
            data.pop(key, None)
        try:
            return validate_service(name, data, settings.TENEMENT_DATA_DIR)
        except ConfigError as e:
            raise ValidationError(field_errors(e, name)) from None


class InstanceViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Tenants' instances, keyed `service:id`. Tenant tokens see only their own."""

    serializer_class = s.InstanceSerializer
    lookup_field = "key"
    lookup_value_regex = KEY_REGEX

    def get_queryset(self) -> QuerySet[Instance]:
        qs = Instance.objects.select_related("service")
        if tenant := tenant_of(self.request):
            qs = qs.filter(instance_id=tenant)
        return qs

    @extend_schema(
        parameters=[
            OpenApiParameter("service", str),
            OpenApiParameter("state", str, enum=list(Instance.State.values)),
            OpenApiParameter("all", bool, description="also sleeping (stopped) instances"),
        ]
    )
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Instances with a process (upstream's `ps`: starting, running, backing off,
        failed...); `all=true` adds sleeping ones, `state=` picks any one state."""
        known_params(request, LIST_PARAMS)
        qs = self.get_queryset()
        params = request.query_params
        if service := params.get("service"):
            qs = qs.filter(service__name=service)
        if state := params.get("state"):
            if state not in Instance.State.values:
                raise ValidationError({"state": [f"must be one of {', '.join(Instance.State)}"]})
            qs = qs.filter(state=state)
        elif params.get("all", "").lower() not in TRUE:
            qs = qs.exclude(state__in=ASLEEP)
        return Response(self.get_serializer(qs, many=True).data)

    def get_serializer_context(self) -> dict[str, Any]:
        return {**super().get_serializer_context(), "now": time.time()}

    def get_object(self) -> Instance:
        try:
            key = parse_key(self.kwargs["key"])
        except InvalidName as e:
            raise ValidationError({"key": [str(e)]}) from None
        instance = (
            self.get_queryset()
            .filter(service__name=key.service, instance_id=key.instance_id)
            .first()
        )
        if instance is None:
            raise NotFound(f"{key} is not registered")
        return instance

    @extend_schema(request=s.InstanceCreateSerializer, responses={201: s.InstanceSerializer})
    def create(self, request: Request) -> Response:
        body = s.InstanceCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        tenant = tenant_of(request)
        if tenant and data["instance_id"] != tenant:
            raise PermissionDenied(f"this token may only act on tenant {tenant!r}")
        try:
            instance, created = ops.register(
                f"{data['service']}:{data['instance_id']}", start=data["start"]
            )
        except ops.OperationError as e:
            raise NotFound(str(e)) from None
        if not created:
            raise Conflict(f"{instance.key} is already registered")
        return Response(self.get_serializer(instance).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={202: s.InstanceSerializer})
    @action(detail=True, methods=["post"])
    def start(self, request: Request, key: str) -> Response:
        return self.change(ops.request_start)

    @extend_schema(request=None, responses={202: s.InstanceSerializer})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, key: str) -> Response:
        return self.change(ops.request_stop)

    @extend_schema(request=None, responses={202: s.InstanceSerializer})
    @action(detail=True, methods=["post"])
    def restart(self, request: Request, key: str) -> Response:
        """Also upstream's: the answer carries its `instance`, `socket` and `port`."""
        response = self.change(ops.request_restart)
        response.data = {**response.data, "instance": response.data["key"]}
        return response

    def change(self, operation: Any) -> Response:
        instance = operation(self.get_object().key)
        return Response(self.get_serializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=s.SpawnSerializer, responses=s.InstanceSerializer)
    @action(detail=False, methods=["post"])
    def spawn(self, request: Request) -> Response:
        """Upstream's spawn: `{process, id}` registers the tenant if new, starts it and
        answers once it is running (`instance`, `socket`, `port` and our fields)."""
        body = s.SpawnSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        key = f"{body.validated_data['process']}:{body.validated_data['id']}"
        tenant = tenant_of(request)
        if tenant and body.validated_data["id"] != tenant:
            raise PermissionDenied(f"this token may only act on tenant {tenant!r}")
        try:
            instance, created = ops.register(key, start=True)
            if not created:
                instance = ops.request_start(key)
        except ops.OperationError as e:
            raise NotFound(str(e)) from None
        # Upstream answers once the process is up, healthy or not: wait for ready, but an
        # app still starting (or retrying) after SPAWN_WAIT is answered as it stands.
        wait = min(instance.service.startup_timeout + PURGE_WAIT_SLACK, SPAWN_WAIT)
        instance = ops.wait_for_states(instance.pk, {"running", "failed"}, wait)
        if instance.state == "failed":
            raise Unavailable(f"{instance.key} did not start: {instance.last_error}")
        data = self.get_serializer(instance).data
        return Response({**data, "instance": str(instance.key)})

    @extend_schema(request=None, responses={204: None})
    @action(detail=True, methods=["post"])
    def deregister(self, request: Request, key: str) -> Response:
        """Forget the tenant (the supervisor stops its process); `purge=true` also deletes
        its data directory, after it has stopped. Before this release, DELETE did this."""
        known_params(request, {"purge"})
        instance = self.get_object()
        purge = request.query_params.get("purge", "").lower() in TRUE
        if purge:
            # Stop first, so nothing writes into the directory while it is removed.
            self.stop_and_wait(instance)
        data_dir = ServiceSpec.from_model(instance.service).instance_dir(instance.instance_id)
        try:
            ops.deregister(instance.key)  # the supervisor stops a running process within a second
        except ops.OperationError as e:  # deregistered by someone else just now
            raise NotFound(str(e)) from None
        if purge:
            shutil.rmtree(data_dir, ignore_errors=True)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @staticmethod
    def stop_and_wait(instance: Instance) -> Instance:
        instance = ops.request_stop(instance.key)
        if instance.state in ("stopped", "failed") or not ops.supervisor_alive():
            return instance  # nothing runs it (no supervisor: nothing to wait for)
        wait = instance.service.stop_timeout + PURGE_WAIT_SLACK
        instance = ops.wait_for_states(instance.pk, {"stopped", "failed"}, wait)
        if instance.state not in ("stopped", "failed") and ops.supervisor_alive():
            raise Conflict(f"{instance.key} did not stop within {wait:g}s")
        return instance

    @extend_schema(responses=s.HealthSerializer)
    @action(detail=True, methods=["get"])
    def health(self, request: Request, key: str) -> Response:
        """Upstream's health: `{instance, health}`, plus the last check's result and time."""
        instance = self.get_object()
        return Response(
            {
                "instance": str(instance.key),
                "health": s.upstream_health(instance),
                "state": instance.state,
                "health_ok": instance.health_ok,
                "health_checked_at": instance.health_checked_at,
            }
        )

    @extend_schema(responses=s.StorageSerializer)
    @action(detail=True, methods=["get"])
    def storage(self, request: Request, key: str) -> Response:
        """Upstream's storage: bytes used under the data dir, the quota and the percent."""
        instance = self.get_object()
        folder = s.data_dir_of(instance)
        used, complete = storage.measure(folder)
        quota = instance.service.storage_quota_mb
        quota_bytes = quota * 2**20 if quota else None
        return Response(
            {
                "used_bytes": used,
                "quota_bytes": quota_bytes,
                "usage_percent": round(used * 100 / quota_bytes, 2) if quota_bytes else None,
                "path": str(folder),
                "complete": complete,
            }
        )

    @extend_schema(
        parameters=[int_param("limit", 1000, "newest first (default 100)")],
        responses=s.EventSerializer(many=True),
    )
    @action(detail=True, methods=["get"])
    def events(self, request: Request, key: str) -> Response:
        known_params(request, {"limit"})
        instance = self.get_object()
        limit = bounded_int(request.query_params.get("limit"), 100, 1000, "limit")
        rows = Event.objects.filter(instance=instance).order_by("-time", "-id")[:limit]
        return Response(s.EventSerializer(rows, many=True).data)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Upstream's stop: the instance stops (SIGTERM, grace, SIGKILL) and the answer
        comes once it has; it stays registered, and a request wakes it. Deregistering is
        POST .../deregister."""
        known_params(request, set())
        self.stop_and_wait(self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


class TokenViewSet(mixins.ListModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """API tokens (admin scope). A new token's secret is in the create response only."""

    queryset = ApiToken.objects.all()
    serializer_class = s.TokenSerializer
    lookup_field = "name"
    lookup_value_regex = "[^/]+"  # token names are free text (but never contain '/')
    required_scope = "admin"

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        known_params(request, set())
        return super().list(request, *args, **kwargs)

    @extend_schema(request=s.TokenCreateSerializer, responses={201: dict})
    def create(self, request: Request) -> Response:
        body = s.TokenCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            minted = tokens.mint(
                data["name"], data["scope"], data.get("tenant", ""), data.get("expires_days")
            )
        except tokens.TokenExists as e:
            raise Conflict(str(e)) from None
        except tokens.TokenError as e:
            raise ValidationError({"non_field_errors": [str(e)]}) from None
        out = dict(s.TokenSerializer(minted.token).data, token=minted.secret)
        return Response(out, status=status.HTTP_201_CREATED)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        try:
            tokens.revoke(kwargs["name"])
        except tokens.TokenError as e:
            raise NotFound(str(e)) from None
        return Response(status=status.HTTP_204_NO_CONTENT)


@csrf_exempt  # it changes nothing; without this a POST would get CSRF's HTML 403
def not_found(request: Any, *args: Any, **kwargs: Any) -> JsonResponse:
    body = {"error": {"status": 404, "message": f"no API endpoint at {request.path}"}}
    return JsonResponse(body, status=404)
