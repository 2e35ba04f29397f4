"""Tenants' own domains: `notes.alice-corp.com` served by `notes:alice`."""

from __future__ import annotations

from django.db import models


class Domain(models.Model):
    """A custom domain routed to an instance exactly like its own host."""

    name = models.CharField(max_length=253, unique=True)
    instance = models.ForeignKey(
        "instances.Instance", on_delete=models.CASCADE, related_name="domains"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name
