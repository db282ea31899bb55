"""Names reserved for the platform's own MQTT clients (the bridge and any other service).

On the mTLS listener a certificate's CN is the MQTT username *and* the client id
(`use_identity_as_username`, `use_username_as_clientid`), and the ACL grants the bridge's
username read access to every device's telemetry. A device named like a service would get
that service's topic rights and could take over its session, so no device may carry such a
name: every `argus-…` name (any case) is the platform's, and so is the bridge's configured
client id. No Django import here: `devices.pki` uses it too.
"""

from __future__ import annotations

from collections.abc import Iterable

SERVICE_PREFIX = "argus-"


def is_reserved_identifier(name: str, also: Iterable[str] = ()) -> bool:
    """True when `name` belongs to a platform service (the `argus-` prefix, or one of `also`)."""
    folded = name.casefold()
    return folded.startswith(SERVICE_PREFIX) or folded in {extra.casefold() for extra in also if extra}
