"""Tenants' own domains: `notes.alice-corp.com` served by `notes:alice`."""

from __future__ import annotations

from django.db import models
from django.db.models import Q

TXT_PREFIX = "_tenement-verify"


class Domain(models.Model):
    """A custom domain routed to an instance exactly like its own host, once verified
    (when verification is asked for)."""

    class Verification(models.TextChoices):
        NONE = "none"  # routed at once
        TXT = "txt"  # routed once _tenement-verify.NAME has the token as a TXT record

    name = models.CharField(max_length=253, unique=True)
    instance = models.ForeignKey(
        "instances.Instance", on_delete=models.CASCADE, related_name="domains"
    )
    verification = models.CharField(
        max_length=8, choices=Verification.choices, default=Verification.NONE
    )
    token = models.CharField(max_length=64, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def routed(self) -> bool:
        return self.verification == self.Verification.NONE or self.verified_at is not None

    @property
    def txt_name(self) -> str:
        return f"{TXT_PREFIX}.{self.name}"

    @property
    def txt_value(self) -> str:
        return f"tenement-verify={self.token}"


ROUTED = Q(verification=Domain.Verification.NONE) | Q(verified_at__isnull=False)
