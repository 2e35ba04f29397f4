"""The add-tenant form: the API's rules for ids (instances.ids), Django's form errors."""

from __future__ import annotations

from django import forms

from instances import operations as ops
from instances.ids import InstanceKey, InvalidName, check_label
from instances.models import Instance, Service


class AddTenantForm(forms.Form):
    service = forms.ChoiceField(label="Service")
    instance_id = forms.CharField(
        label="Tenant id",
        max_length=63,
        strip=False,  # " alice" is a bad id, not a typo to fix silently
        help_text="Lowercase letters, digits and '-'; it becomes the subdomain.",
    )
    start = forms.BooleanField(label="Start it now", required=False, initial=True)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        names = Service.objects.values_list("name", flat=True)
        self.fields["service"].choices = [(name, name) for name in names]
        # The service must exist; say so plainly rather than "not one of the choices".
        self.fields["service"].error_messages["invalid_choice"] = "No service named %(value)r."

    def clean_instance_id(self) -> str:
        try:
            return check_label(self.cleaned_data["instance_id"])
        except InvalidName as e:
            message = str(e)
            raise forms.ValidationError(message[0].upper() + message[1:]) from None

    def save(self) -> Instance | None:
        """Register (and maybe start); a name already taken becomes a form error."""
        key = InstanceKey(self.cleaned_data["service"], self.cleaned_data["instance_id"])
        try:
            instance, created = ops.register(key, start=self.cleaned_data["start"])
        except ops.OperationError as e:  # the service was removed just now
            self.add_error("service", str(e))
            return None
        if not created:
            self.add_error("instance_id", f"{key} is already registered.")
            return None
        return instance
