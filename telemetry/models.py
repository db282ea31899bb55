"""Telemetry storage: the raw audit trail, the time series and chunked transactions (tenant schema)."""

from __future__ import annotations

from django.db import models
from django.db.models import F, Q

from devices.models import Device


class RawStatus(models.TextChoices):
    ACCEPTED = "accepted", "Accepted"
    REJECTED = "rejected", "Rejected"
    CHUNK = "chunk", "Chunk stored for reassembly"
    IGNORED = "ignored", "Chunk of a finished transaction"


class Transport(models.TextChoices):
    MQTT = "mqtt", "MQTT"
    HTTP = "http", "HTTP"


class TelemetryRaw(models.Model):
    """One message as it reached the platform, byte for byte; append-only (enforced by a trigger)."""

    # Range-partitioned by received_at, a partition a UTC day (migration 0006), so that retention
    # drops whole days (docs/retention.md). The database's primary key is (id, received_at), and
    # the ingest key is unique within each day's partition (a unique index of a partitioned table
    # must include its partition key); storage.py looks across midnight for redeliveries.
    # Thousands of inserts a second: every index and check counts. The device's lookups use
    # telemetry_raw_device_recv_idx. No foreign-key constraint in the database: its check
    # locks the device's row on every insert (FOR KEY SHARE), which cost more PostgreSQL time than
    # the COPY itself while ingest rewrote last_seen (issue 4). Ingest only stores ids of devices
    # it has just resolved, and PROTECT still keeps the ORM from deleting a device with raw rows.
    device = models.ForeignKey(
        Device, null=True, on_delete=models.PROTECT, related_name="+", db_index=False, db_constraint=False
    )
    logical_identifier = models.CharField(max_length=128)
    msg_id = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001 - contract: null when none
    # Idempotency key: `<logical id>/m/<msg_id>` when the message carries one, else the id the
    # bridge or HTTP endpoint gave it; a redelivered message never makes a second row.
    ingest_key = models.CharField(max_length=400)
    payload = models.BinaryField()
    received_at = models.DateTimeField()
    stored_at = models.DateTimeField(auto_now_add=True)
    transport = models.CharField(max_length=10, choices=Transport.choices, default=Transport.MQTT)
    status = models.CharField(max_length=20, choices=RawStatus.choices)
    reason = models.TextField(blank=True)
    readings = models.PositiveIntegerField(default=0)

    class Meta:
        db_table = "telemetry_raw"
        indexes = [
            models.Index(fields=["device", "-received_at"], name="telemetry_raw_device_recv_idx"),
            # Accepted rows and chunks are the bulk and are found by device (chunks through their
            # transaction); only the others, rejected and ignored, by status.
            models.Index(
                fields=["status", "-received_at"],
                name="telemetry_raw_status_idx",
                condition=~Q(status__in=["accepted", "chunk"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.logical_identifier} {self.status} {self.received_at:%Y-%m-%d %H:%M:%S}"


class TelemetryHistory(models.Model):
    """One reading: (time, device, metric) -> value. A range-partitioned table made by migration."""

    pk = models.CompositePrimaryKey("device_id", "metric", "time")
    time = models.DateTimeField()
    device_id = models.BigIntegerField()
    metric = models.CharField(max_length=64)
    value = models.FloatField()
    raw_id = models.BigIntegerField(help_text="The telemetry_raw row this reading came from.")

    class Meta:
        db_table = "telemetry_history"
        managed = False

    def __str__(self) -> str:
        return f"{self.device_id} {self.metric}={self.value} @ {self.time.isoformat()}"


class TransactionStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    COMPLETE = "complete", "Complete"
    EXPIRED = "expired", "Expired"
    FAILED = "failed", "Failed"


class TelemetryTransaction(models.Model):
    """One chunked gateway message being reassembled; its readings are stored all at once or never."""

    device = models.ForeignKey(Device, on_delete=models.PROTECT, related_name="transactions")
    transaction_id = models.CharField(max_length=128, unique=True)
    status = models.CharField(max_length=10, choices=TransactionStatus.choices, default=TransactionStatus.PENDING)
    expected_chunks = models.PositiveIntegerField()
    received_chunks = models.PositiveIntegerField(default=0)
    first_chunk_at = models.DateTimeField()
    last_chunk_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    completed_at = models.DateTimeField(null=True, blank=True)
    readings = models.PositiveIntegerField(default=0)
    missing_chunks = models.JSONField(null=True, blank=True)
    reason = models.TextField(blank=True)

    class Meta:
        db_table = "telemetry_transactions"
        indexes = [models.Index(fields=["status", "expires_at"], name="telemetry_tx_status_exp_idx")]
        constraints = [
            models.CheckConstraint(condition=Q(expected_chunks__gte=1), name="telemetry_tx_expected_positive"),
            models.CheckConstraint(
                condition=Q(received_chunks__lte=F("expected_chunks")), name="telemetry_tx_received_le_expected"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.transaction_id} {self.received_chunks}/{self.expected_chunks} {self.status}"


class TelemetryChunk(models.Model):
    """One chunk of a pending transaction, kept until the transaction completes or expires."""

    # Chunks are inserted and deleted over a thousand times a second: one index, the unique
    # (transaction, index) pair, serves every lookup. No foreign key to the raw row in the
    # database: a partitioned table's rows cannot be referenced by id alone (its key includes
    # received_at), and a chunk goes long before its raw row's day expires.
    transaction = models.ForeignKey(
        TelemetryTransaction, on_delete=models.CASCADE, related_name="chunks", db_index=False
    )
    chunk_index = models.PositiveIntegerField()
    payload = models.BinaryField()
    raw = models.ForeignKey(
        TelemetryRaw, on_delete=models.PROTECT, related_name="+", db_index=False, db_constraint=False
    )
    received_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    class Meta:
        db_table = "telemetry_chunks"
        constraints = [
            models.UniqueConstraint(fields=["transaction", "chunk_index"], name="telemetry_chunks_uniq"),
        ]

    def __str__(self) -> str:
        return f"{self.transaction_id}#{self.chunk_index}"
