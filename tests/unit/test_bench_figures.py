"""The bench's per-item CPU figures (service.bench.cpu_per_item): the arithmetic the
closing notes quote, so that a mistake in it cannot pass for a speed-up."""

from __future__ import annotations

from service.bench import contract_figures, cpu_ceilings, cpu_per_item, percentiles
from service.bench_contract import STAGES, StageClock


def test_cpu_per_contact_counts_every_deletion_side_process() -> None:
    all_in_one = cpu_per_item({"service": 5.0, "wall": 9.0}, 10_000, "contact")
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


def test_the_broker_it_started_is_reported_beside_the_service_and_the_server() -> None:
    figures = cpu_per_item({"service": 5.0, "postgres": 2.0, "kafka": 1.0}, 10_000, "contact")
    assert figures == {
        "cpu_ms_per_contact": 0.5,
        "db_cpu_ms_per_contact": 0.2,
        "broker_cpu_ms_per_contact": 0.1,
    }
    # Per delivery: the broker's CPU beyond the deletion phase, like the server's.
    before = {"service": 5.0, "kafka": 1.0}
    after = {"service": 9.0, "kafka": 1.8}
    assert cpu_per_item(after, 4_000, "delivery", before=before) == {
        "cpu_ms_per_delivery": 1.0,
        "broker_cpu_ms_per_delivery": 0.2,
    }


def test_ceilings_are_the_cores_over_the_cpu_per_contact_against_the_floor() -> None:
    figures = {
        "cpu_ms_per_contact": 0.3,
        "db_cpu_ms_per_contact": 0.15,
        "broker_cpu_ms_per_contact": 0.05,
        "floor_contacts_per_s": 20_000.0,
    }
    # 2 cores / 0.2 ms of server and broker CPU = 10,000/s; with the service 2 / 0.5 ms.
    assert cpu_ceilings(figures, 2) == {
        "infra_ceiling_contacts_per_s": 10_000,
        "infra_ceiling_to_floor_ratio": 0.5,
        "cpu_ceiling_contacts_per_s": 4_000,
        "cpu_ceiling_to_floor_ratio": 0.2,
    }


def test_on_sqlite_the_ceiling_counts_the_broker_alone() -> None:
    figures = {"cpu_ms_per_contact": 0.35, "broker_cpu_ms_per_contact": 0.05}
    assert cpu_ceilings(figures, 2) == {
        "infra_ceiling_contacts_per_s": 40_000,
        "infra_ceiling_to_floor_ratio": None,
        "cpu_ceiling_contacts_per_s": 5_000,
        "cpu_ceiling_to_floor_ratio": None,
    }


def test_no_broker_figure_no_ceiling() -> None:
    """A reused broker serves others too: no figure, and no ceiling from half the CPU."""
    figures = {"cpu_ms_per_contact": 0.3, "db_cpu_ms_per_contact": 0.15}
    assert cpu_ceilings(figures, 2) == {}
    assert cpu_ceilings({"broker_cpu_ms_per_contact": 0.0}, 2) == {
        "infra_ceiling_contacts_per_s": None,
        "infra_ceiling_to_floor_ratio": None,
    }


def test_no_items_no_figure() -> None:
    assert cpu_per_item({"service": 1.0}, 0, "delivery") == {"cpu_ms_per_delivery": None}


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "max": None}


def _clock(
    seconds: dict[str, float], cpu: dict[str, float], server: dict[str, float]
) -> StageClock:
    clock = StageClock()
    clock.seconds, clock.cpu, clock.server = seconds, cpu, server
    return clock


def test_contract_floor_figures_whole_and_deletion_part_against_both_floors() -> None:
    """10,000 contacts in 2 s, of which the API, relay and worker stages took 1 s and
    three quarters of the CPU: rates, ratios to the bare floor and from the service's end
    to end, CPU per contact (the meter's totals split by the stage clock) and ceilings."""
    half = dict.fromkeys(STAGES, 0.0) | {"api": 0.25, "relay": 0.25, "worker": 0.5}
    seconds = {s: half.get(s, 0.0) or 1 / 3 for s in STAGES}
    cpu = {s: 0.75 / 3 if s in ("api", "relay", "worker") else 0.25 / 3 for s in STAGES}
    clock = _clock(seconds, cpu, cpu)
    figures = {"floor_contacts_per_s": 50_000.0, "end_to_end_contacts_per_s": 2_500.0}
    out = contract_figures(figures, {"bench": 4.0, "postgres": 2.0}, clock, 10_000, 2)
    assert out["contract_floor_contacts_per_s"] == 5_000.0
    assert out["contract_floor_to_floor_ratio"] == 0.1
    assert out["service_to_contract_floor_ratio"] == 0.5
    assert (
        out["contract_floor_cpu_ms_per_contact"],
        out["contract_floor_db_cpu_ms_per_contact"],
    ) == (
        0.4,
        0.2,
    )
    assert out["contract_floor_cpu_ceiling_contacts_per_s"] == round(2_000 / 0.6)
    assert out["contract_floor_deletion_contacts_per_s"] == 10_000.0
    assert out["contract_floor_deletion_to_floor_ratio"] == 0.2
    assert out["service_to_contract_floor_deletion_ratio"] == 0.25
    assert out["contract_floor_deletion_cpu_ms_per_contact"] == 0.3
    assert out["contract_floor_deletion_db_cpu_ms_per_contact"] == 0.15
    assert out["contract_floor_deletion_cpu_ceiling_contacts_per_s"] == round(2_000 / 0.45)
    assert out["contract_floor_deletion_cpu_ceiling_to_floor_ratio"] == round(
        round(2_000 / 0.45) / 50_000, 3
    )
    assert out["contract_floor_stages"]["worker"] == {
        "seconds": 0.5,
        "cpu_ms_per_contact": 0.025,
        "db_cpu_ms_per_contact": 0.025,
    }


def test_contract_floor_on_sqlite_has_no_server_figures() -> None:
    clock = _clock(
        dict.fromkeys(STAGES, 0.5), dict.fromkeys(STAGES, 0.1), dict.fromkeys(STAGES, 0.0)
    )
    out = contract_figures({"floor_contacts_per_s": None}, {"bench": 0.6}, clock, 3_000, 2)
    assert out["contract_floor_contacts_per_s"] == 1_000.0
    assert out["contract_floor_cpu_ms_per_contact"] == 0.2
    assert "contract_floor_db_cpu_ms_per_contact" not in out
    assert out["contract_floor_to_floor_ratio"] is None
    assert out["service_to_contract_floor_ratio"] is None
    assert "db_cpu_ms_per_contact" not in out["contract_floor_stages"]["api"]
