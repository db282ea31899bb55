#!/bin/sh
# One-shot PKI initialisation for docker/compose.yaml (the `pki` service), idempotent: the device
# CA, the broker's server certificate, each bridge's client certificate and the CRL, each made
# only if missing (the CRL is rebuilt every time). tests/test_compose_pki.py runs this very file
# with temporary directories and connects a bridge and a device with what it wrote.
#
#   PKI_DIR         the CA key lives here (volume `pki`: only this job and the worker mount it)
#   PKI_PUBLIC_DIR  the CA certificate and the CRL, for every other service (volume `pki-public`)
#   PKI_BRIDGE_DIR  each bridge's certificate and key, for the bridges only (volume `pki-bridge`)
#   BROKER_HOSTS    names the broker's certificate is valid for (what the bridge connects to)
#   BRIDGE_NAMES    bridges' certificate CNs; each must be a `user` in docker/mosquitto/acl
#   PKI_OWNER       user that owns the files afterwards (empty: leave them to the caller)
set -eu

PKI_DIR=${PKI_DIR:-/pki}
PKI_PUBLIC_DIR=${PKI_PUBLIC_DIR:-/pki-public}
PKI_BRIDGE_DIR=${PKI_BRIDGE_DIR:-/pki-bridge}
BROKER_HOSTS=${BROKER_HOSTS:-mosquitto localhost}
BRIDGE_NAMES=${BRIDGE_NAMES:-argus-bridge}
PKI_OWNER=${PKI_OWNER-argus}
PYTHON=${PYTHON:-python}

pki() { "$PYTHON" manage.py pki "$@" --out "$PKI_DIR"; }

test -f "$PKI_DIR/ca.crt" || pki init-ca
# shellcheck disable=SC2086 # BROKER_HOSTS is a list of names
test -f "$PKI_DIR/server.crt" || pki issue-server $BROKER_HOSTS
mkdir -p "$PKI_PUBLIC_DIR" "$PKI_BRIDGE_DIR"
for name in $BRIDGE_NAMES; do
    test -f "$PKI_DIR/clients/$name.crt" || pki issue-client "$name"
    cp "$PKI_DIR/clients/$name.crt" "$PKI_DIR/clients/$name.key" "$PKI_BRIDGE_DIR/"
done
pki crl
cp "$PKI_DIR/ca.crt" "$PKI_DIR/crl.pem" "$PKI_PUBLIC_DIR/"

if [ -n "$PKI_OWNER" ]; then
    chown -R "$PKI_OWNER:$PKI_OWNER" "$PKI_DIR" "$PKI_PUBLIC_DIR" "$PKI_BRIDGE_DIR"
    # Mosquitto (uid 1883 in its image) reads its key from the pki volume; nobody else may.
    chown 1883:1883 "$PKI_DIR/server.key"
    chmod 0400 "$PKI_DIR/server.key" "$PKI_BRIDGE_DIR"/*.key
fi
