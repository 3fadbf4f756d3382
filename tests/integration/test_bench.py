"""`contact-deletion bench` run for real, small: it deletes, delivers and measures, and it
stops everything it started, on success and on SIGTERM.

The bench is how speed is checked (never timed tests), so it is tested like the rest: the
real command on a SQLite file, with its own broker (as ``make bench`` runs it: its CPU is
one of the figures) or the session's (reused through ``KAFKA_BOOTSTRAP_SERVERS``), with
``TMPDIR`` pointed at the test's directory, so that whatever it started (broker, service,
receivers) is found afterwards by that variable in its environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _bench(
    args: list[str], kafka_bootstrap: str | None, tmp: Path, stderr: Path
) -> subprocess.Popen[bytes]:
    """The bench on ``kafka_bootstrap``, or (None) on a broker it starts itself."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("DATABASE_URL", None)
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    if kafka_bootstrap is not None:
        env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_bootstrap
    with stderr.open("wb") as errors:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "bench", "--json-only", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=errors,
            # As a process started in the background of a non-interactive shell (CI) has it:
            # SIGINT ignored. The bench must stop on SIGTERM all the same.
            preexec_fn=_ignore_sigint,
        )


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _started_by(tmp: Path) -> list[int]:
    """Live processes (other than zombies) whose environment has ``TMPDIR=<tmp>``."""
    marker = f"TMPDIR={tmp}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(proc.name))
    return found


def _assert_nothing_left(tmp: Path) -> None:
    deadline = time.monotonic() + 10
    while (left := _started_by(tmp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"processes the bench started are still running: {left}"
    assert [p.name for p in tmp.iterdir() if p.name.startswith("cdbench-")] == []


def test_a_small_run_deletes_delivers_and_reports(tmp_path: Path) -> None:
    """On a broker of its own: its CPU per contact and the ceilings are reported, and the
    broker is stopped with the rest."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    process = _bench(
        ["--contacts", "200", "--webhooks", "1", "--batch", "50"],
        None,
        tmp,
        tmp_path / "stderr",
    )
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, (tmp_path / "stderr").read_text()[-3000:]
    figures = json.loads(out.decode().strip().splitlines()[-1])
    assert (figures["deleted"], figures["contacts_left"]) == (200, 0)
    assert figures["webhook_deliveries"] == figures["webhook_deliveries_expected"] == 200
    assert (figures["webhook_invalid_signatures"], figures["webhook_duplicates"]) == (0, 0)
    assert figures["webhook_floor_deliveries"] == 200
    assert figures["webhook_floor_invalid_signatures"] == 0
    assert figures["cpu_ms_per_contact"] > 0
    # Beyond the deletion phase: about 0 when the dispatcher kept up with 200 contacts.
    assert figures["cpu_ms_per_delivery"] >= 0
    assert figures["floor_contacts_per_s"] > 0 and figures["service_to_floor_ratio"] > 0
    assert figures["kafka"] == "local"
    assert figures["broker_cpu_ms_per_contact"] > 0
    assert figures["broker_cpu_ms_per_delivery"] >= 0
    assert figures["infra_ceiling_contacts_per_s"] > 0
    assert figures["infra_ceiling_to_floor_ratio"] > 0
    assert figures["cpu_ceiling_contacts_per_s"] > 0
    assert figures["cpu_ceiling_to_floor_ratio"] > 0
    # The contract floor: its rate against the bare floor, the service against it, and
    # the rows it writes per contact, table by table, the service's own on the sample.
    assert figures["contract_floor_contacts_per_s"] > 0
    assert 0 < figures["contract_floor_to_floor_ratio"] < 1
    assert figures["service_to_contract_floor_ratio"] > 0
    whole, deletion = "contract_floor_contacts_per_s", "contract_floor_deletion_contacts_per_s"
    assert figures[deletion] > figures[whole]
    assert figures["contract_floor_cpu_ceiling_contacts_per_s"] > 0
    rows = figures["rows_per_contact"]
    assert rows["sample_contacts"] == 200

    def distinct(side: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        # Per row, not per version; the dispatcher's endpoint leases are per second.
        return {
            table: {op: v for op, v in ops.items() if op != "writes"}
            for table, ops in side.items()
            if table != "webhook_endpoints"
        }

    assert distinct(rows["service"]) == distinct(rows["contract_floor"])
    assert rows["contract_floor"]["contacts"] == {"delete": 1.0, "writes": 1.0}
    _assert_nothing_left(tmp)


def test_sigterm_stops_the_run_and_everything_it_started(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """SIGTERM while the service deletes: exit 130 soon, nothing left running or on disk
    (SIGINT is ignored in the bench's process, as in CI: SIGTERM does not lean on it)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    stderr = tmp_path / "stderr"
    # Paced, so the deletion phase lasts long enough to be interrupted in it.
    process = _bench(["--contacts", "5000", "--rate", "200"], kafka_bootstrap, tmp, stderr)
    deadline = time.monotonic() + 120
    while b"bench_deleting" not in stderr.read_bytes():
        assert process.poll() is None, stderr.read_text()[-3000:]
        assert time.monotonic() < deadline, "the bench did not reach its deletion phase"
        time.sleep(0.2)
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 130, stderr.read_text()[-3000:]
    assert "interrupted; everything it started is stopped" in stderr.read_text()
    _assert_nothing_left(tmp)
