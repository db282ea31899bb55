"""The read API of devices (docs/api.md): devices, their latest values and their history."""
