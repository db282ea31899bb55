from django.apps import AppConfig


class BridgeConfig(AppConfig):
    """The MQTT -> NATS JetStream bridge (no models)."""

    name = "bridge"
