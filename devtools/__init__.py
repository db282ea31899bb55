"""Tooling that is not the product: the service helper behind `make demo`/`make test`, the demo,
the device simulator, the benchmarks and the child-process supervisor they share.

Nothing in the runtime apps (`argus`, `devices`, `telemetry`, `bridge`, `assets`) imports this
package (tests/test_layers.py checks it), and the Docker image leaves it out.
"""
