"""Alerts named `active` become `open` (the lifecycle open -> acknowledged -> resolved), and asset
types on the threshold health algorithm move from its first form (a score per matching rule) to
its second (100 minus a penalty per open alert), with the default penalties."""

from typing import Any

from django.db import migrations


def forwards(apps: Any, schema_editor: Any) -> None:
    apps.get_model("assets", "Alert").objects.filter(status="active").update(status="open")
    AssetType = apps.get_model("assets", "AssetType")
    for asset_type in AssetType.objects.filter(health_algorithm="threshold"):
        if "rules" in asset_type.health_parameters:
            asset_type.health_parameters = {"penalties": {"info": 5, "warning": 20, "critical": 50}}
            asset_type.save(update_fields=["health_parameters"])


def backwards(apps: Any, schema_editor: Any) -> None:
    apps.get_model("assets", "Alert").objects.filter(status="open").update(status="active")


class Migration(migrations.Migration):
    dependencies = [("assets", "0002_alerts_lifecycle_health_history_webhooks")]

    operations = [migrations.RunPython(forwards, backwards)]
