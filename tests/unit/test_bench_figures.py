"""The bench's per-item CPU figures (service.bench.cpu_per_item): the arithmetic the
closing notes quote, so that a mistake in it cannot pass for a speed-up."""

from __future__ import annotations

from service.bench import cpu_per_item, percentiles


def test_cpu_per_contact_counts_every_deletion_side_process() -> None:
    all_in_one = cpu_per_item({"service": 5.0, "kafka": 1.0, "wall": 9.0}, 10_000, "contact")
    assert all_in_one == {"cpu_ms_per_contact": 0.5}
    split = cpu_per_item(
        {"api": 1.0, "relay": 1.0, "worker": 2.0, "dispatcher": 3.0, "wall": 9.0},
        10_000,
        "contact",
    )
    assert split == {"cpu_ms_per_contact": 0.4}


def test_postgres_server_cpu_is_reported_beside_the_service() -> None:
    figures = cpu_per_item({"service": 4.0, "postgres": 2.0}, 8_000, "contact")
    assert figures == {"cpu_ms_per_contact": 0.5, "db_cpu_ms_per_contact": 0.25}


def test_cpu_per_delivery_is_beyond_the_deletion_phase_or_the_dispatcher_alone() -> None:
    before = {"service": 5.0, "postgres": 1.0}
    after = {"service": 9.0, "postgres": 3.0}
    assert cpu_per_item(after, 4_000, "delivery", before=before) == {
        "cpu_ms_per_delivery": 1.0,
        "db_cpu_ms_per_delivery": 0.5,
    }
    split = {"worker": 9.0, "dispatcher": 2.0}
    assert cpu_per_item(split, 4_000, "delivery", before={"worker": 5.0}) == {
        "cpu_ms_per_delivery": 0.5
    }


def test_no_items_no_figure() -> None:
    assert cpu_per_item({"service": 1.0}, 0, "delivery") == {"cpu_ms_per_delivery": None}


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "max": None}
