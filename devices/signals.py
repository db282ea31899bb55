"""Cache invalidation (derived data only): running processes drop changed profiles."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from argus.invalidation import publish_invalidation
from argus.registry import current_schema
from devices.models import Device, DeviceType


@receiver([post_save, post_delete], sender=Device)
def device_changed(sender: type[Device], instance: Device, **kwargs: Any) -> None:
    publish_invalidation("device", current_schema(), instance.logical_identifier)


@receiver([post_save, post_delete], sender=DeviceType)
def device_type_changed(sender: type[DeviceType], instance: DeviceType, **kwargs: Any) -> None:
    publish_invalidation("type", current_schema(), str(instance.pk))
