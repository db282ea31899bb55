"""Devices: list, read, create and update (what the admin does). Their readings (latest values,
history) are telemetry's: telemetry/api/readings.py."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, viewsets

from argus.api import TenantAPI
from devices.api.filters import DeviceFilterSet
from devices.api.serializers import DeviceSerializer
from devices.models import Device

# A logical id in a URL (devices.models.logical_identifier_validator).
LOGICAL_ID_REGEX = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"


@extend_schema_view(
    list=extend_schema(summary="Devices of the tenant", tags=["devices"]),
    retrieve=extend_schema(summary="One device", tags=["devices"]),
    create=extend_schema(summary="Register a device", tags=["devices"]),
    update=extend_schema(summary="Replace a device's settings", tags=["devices"]),
    partial_update=extend_schema(summary="Change some of a device's settings", tags=["devices"]),
)
class DeviceViewSet(
    TenantAPI,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet[Device],
):
    queryset = Device.objects.with_presence().select_related("device_type", "parent_device")
    serializer_class = DeviceSerializer
    filterset_class = DeviceFilterSet
    ordering = "logical_identifier"
    lookup_field = "logical_identifier"
    lookup_url_kwarg = "logical_id"
    lookup_value_regex = LOGICAL_ID_REGEX
