"""TENANT_LIMIT_SET_CALLS (argus/settings.py): django-tenants sends `SET search_path` only when
the schema changes, not before every statement. A session-level SET is transactional in
PostgreSQL, so a rolled-back transaction or savepoint reverts it behind django-tenants' back;
these tests make sure a connection never goes on reading one tenant's tables while Django
believes it is in another's, whichever way the schema changed and whatever was rolled back.
"""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django_tenants.utils import schema_context

from devices.models import Device
from tests.conftest import TenantPersona, make_device, make_device_type


class Boom(Exception):
    pass


def _seen(*ours: str) -> set[str]:
    """Which of this test's devices the current schema shows (the tenants keep other tests' too)."""
    return set(Device.objects.filter(logical_identifier__in=ours).values_list("logical_identifier", flat=True))


def _server_search_path() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW search_path")
        return str(cursor.fetchone()[0])


@pytest.fixture
def two_tenants(live_db: None, alpha: TenantPersona, beta: TenantPersona) -> tuple[str, str, str, str]:
    with schema_context(alpha.schema):
        a = make_device(make_device_type()).logical_identifier
    with schema_context(beta.schema):
        b = make_device(make_device_type()).logical_identifier
    return alpha.schema, a, beta.schema, b


def test_it_reads_each_tenants_own_rows_when_switching_back_and_forth(two_tenants: tuple[str, str, str, str]) -> None:
    alpha, a, beta, b = two_tenants
    for _ in range(3):
        with schema_context(alpha):
            assert _seen(a, b) == {a}
        with schema_context(beta):
            assert _seen(a, b) == {b}


def test_a_rolled_back_transaction_does_not_leave_the_connection_in_the_previous_tenant(
    two_tenants: tuple[str, str, str, str],
) -> None:
    alpha, a, beta, b = two_tenants
    with schema_context(beta):
        assert _seen(a, b) == {b}  # the server's path is now beta's, outside any transaction
        with schema_context(alpha):
            with pytest.raises(Boom), transaction.atomic():
                assert _seen(a, b) == {a}  # SET to alpha inside the transaction ...
                raise Boom
            # ... which the rollback reverted on the server: django-tenants must set it again.
            assert alpha in _server_search_path()
            assert _seen(a, b) == {a}
        assert _seen(a, b) == {b}


def test_a_rolled_back_savepoint_does_not_leave_the_connection_in_the_previous_tenant(
    two_tenants: tuple[str, str, str, str],
) -> None:
    alpha, a, beta, b = two_tenants
    with schema_context(beta), transaction.atomic():
        assert _seen(a, b) == {b}
        with schema_context(alpha):
            with pytest.raises(Boom), transaction.atomic():  # a savepoint
                assert _seen(a, b) == {a}
                raise Boom
            assert _seen(a, b) == {a}
        assert _seen(a, b) == {b}
