"""/api/domains: tenants' own domains (list, add, show, remove). Tenant tokens see and
change only their own tenant's."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
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
    routed = serializers.BooleanField(read_only=True)
    txt_record = serializers.SerializerMethodField()

    class Meta:
        model = Domain
        fields = (
            "name",
            "instance",
            "verification",
            "routed",
            "txt_record",
            "verified_at",
            "created_at",
        )

    def get_instance(self, domain: Domain) -> str:
        return f"{domain.instance.service.name}:{domain.instance.instance_id}"

    def get_txt_record(self, domain: Domain) -> dict[str, str] | None:
        """What to publish before `verify` (verification "txt" only)."""
        if domain.verification != Domain.Verification.TXT:
            return None
        return {"name": domain.txt_name, "value": domain.txt_value}


class DomainCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=300, help_text="e.g. notes.alice-corp.com")
    instance = serializers.CharField(max_length=130, help_text="SERVICE:ID, e.g. notes:alice")
    verification = serializers.ChoiceField(
        choices=Domain.Verification.values,
        default=Domain.Verification.NONE,
        help_text="none: routed at once; txt: routed once `verify` finds the TXT record",
    )


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
                body.validated_data["name"],
                instance,
                key,
                settings.TENEMENT_DOMAIN,
                body.validated_data["verification"],
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

    @extend_schema(request=None, responses={200: DomainSerializer})
    @action(detail=True, methods=["post"])
    def verify(self, request: Request, name: str) -> Response:
        """Check the TXT record now; 200 once verified (then routed), else 400 saying what
        DNS has instead."""
        domain = self.get_object()
        try:
            domains.verify(domain)
        except domains.DomainError as e:
            raise ValidationError({"name": [str(e)]}) from None
        return Response(self.get_serializer(domain).data)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        domain = self.get_object()
        domains.remove(domain)
        log.info("custom domain %s removed", domain.name, extra={"event": "domain_removed"})
        return Response(status=status.HTTP_204_NO_CONTENT)
