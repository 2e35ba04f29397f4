"""/api/domains: tenants' own domains (list, add, show, remove). Tenant tokens see and
change only their own tenant's."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from instances.api.auth import tenant_of
from instances.api.errors import Conflict
from instances.ids import InvalidName, parse_key
from instances.models import Instance
from routing import domains
from routing.models import Domain

log = logging.getLogger("tenement.api")


class DomainSerializer(serializers.ModelSerializer):
    instance = serializers.SerializerMethodField()

    class Meta:
        model = Domain
        fields = ("name", "instance", "created_at")

    def get_instance(self, domain: Domain) -> str:
        return f"{domain.instance.service.name}:{domain.instance.instance_id}"


class DomainCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=300, help_text="e.g. notes.alice-corp.com")
    instance = serializers.CharField(max_length=130, help_text="SERVICE:ID, e.g. notes:alice")


class DomainViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Custom domains, routed like the tenant's own host (and given a certificate on
    their first HTTPS handshake when TLS is on)."""

    serializer_class = DomainSerializer
    lookup_field = "name"
    lookup_value_regex = r"[^/]+"

    def get_queryset(self) -> QuerySet[Domain]:
        qs = Domain.objects.select_related("instance__service")
        if tenant := tenant_of(self.request):
            qs = qs.filter(instance__instance_id=tenant)
        return qs

    def get_object(self) -> Domain:
        domain = self.get_queryset().filter(name=self.kwargs["name"].lower()).first()
        if domain is None:
            raise NotFound(f"no custom domain {self.kwargs['name']!r}")
        return domain

    @extend_schema(request=DomainCreateSerializer, responses={201: DomainSerializer})
    def create(self, request: Request) -> Response:
        body = DomainCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        instance = self.instance_of(body.validated_data["instance"])
        key = parse_key(body.validated_data["instance"])
        try:
            domain = domains.add(
                body.validated_data["name"], instance, key, settings.TENEMENT_DOMAIN
            )
        except domains.DomainTaken as e:
            raise Conflict(str(e)) from None
        except domains.DomainError as e:
            raise ValidationError({"name": [str(e)]}) from None
        log.info("custom domain %s -> %s added", domain.name, key, extra={"event": "domain_added"})
        return Response(self.get_serializer(domain).data, status=status.HTTP_201_CREATED)

    def instance_of(self, text: str) -> Instance:
        try:
            key = parse_key(text)
        except InvalidName as e:
            raise ValidationError({"instance": [str(e)]}) from None
        tenant = tenant_of(self.request)
        if tenant and key.instance_id != tenant:
            raise PermissionDenied(f"this token may only act on tenant {tenant!r}")
        instance = Instance.objects.filter(
            service__name=key.service, instance_id=key.instance_id
        ).first()
        if instance is None:
            raise ValidationError({"instance": [f"{key} is not registered"]})
        return instance

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        domain = self.get_object()
        domains.remove(domain)
        log.info("custom domain %s removed", domain.name, extra={"event": "domain_removed"})
        return Response(status=status.HTTP_204_NO_CONTENT)
