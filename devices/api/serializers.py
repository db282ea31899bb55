"""Wire shapes of devices, their latest values and their history."""

from __future__ import annotations

from rest_framework import serializers

from argus.api import ModelCleaned, SlugRelation, bounded_json
from devices.models import Device, DeviceRole, DeviceType


class DeviceSerializer(ModelCleaned):
    """A device; its `type` by name and its `gateway` (of a child) by logical id, as operators know them."""

    logical_id = serializers.CharField(source="logical_identifier", max_length=128)
    type = SlugRelation(source="device_type", slug_field="name", queryset=DeviceType.objects.all())
    role = serializers.ChoiceField(source="device_role", choices=DeviceRole.choices, required=False)
    gateway = SlugRelation(
        source="parent_device",
        slug_field="logical_identifier",
        queryset=Device.objects.all(),
        allow_null=True,
        required=False,
        help_text="The gateway of a child device.",
    )
    metadata = serializers.JSONField(required=False, validators=[bounded_json])
    online = serializers.BooleanField(
        read_only=True, allow_null=True, help_text="As its status topic last said; null: it never said."
    )
    presence_since = serializers.DateTimeField(read_only=True, allow_null=True)
    last_disconnect_reason = serializers.CharField(read_only=True)
    inactive = serializers.SerializerMethodField(
        help_text="Silent for ARGUS_PRESENCE_INACTIVE_INTERVALS of its type's expected interval."
    )
    network_metadata = serializers.JSONField(required=False, validators=[bounded_json])

    class Meta:
        model = Device
        fields = [
            "logical_id",
            "name",
            "type",
            "role",
            "gateway",
            "protocol",
            "status",
            "metadata",
            "network_metadata",
            "last_seen",
            "online",
            "presence_since",
            "last_disconnect_reason",
            "inactive",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["last_seen", "created_at", "updated_at"]

    def get_inactive(self, obj: Device) -> bool:
        # Annotated by the viewset's queryset (Device.objects.with_presence()); a device just
        # created or updated through the API is re-read without it: it was heard from just now
        # or not at all, and counts as inactive only by its own annotation.
        return bool(getattr(obj, "inactive", False))
