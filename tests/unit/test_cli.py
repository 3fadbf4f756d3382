"""The `contact-deletion` command line as a newcomer meets it: help, version, paths."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service import cli
from service.app import components
from service.config import Settings, default_data_dir
from service.keys import SCOPES


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = [(path, parser)]
    for name, child in _subparsers(parser).items():
        found += _walk(child, (*path, name))
    return found


def test_every_subcommand_and_every_option_has_help() -> None:
    """Each subcommand is listed with a summary, and each of its options says what it
    does (argparse's own -h/--help and --version aside)."""
    parser = cli.build_parser()
    walked = _walk(parser)
    names = {" ".join(p) for p, _ in walked}
    for expected in ("run", "api", "relay", "worker", "dispatcher", "migrate", "dev"):
        assert expected in names
    for wanted in ("keys create", "keys list", "keys revoke", "audit verify", "bench"):
        assert wanted in names
    for path, sub in walked:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, (path, choice.dest)
            elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
                assert action.help, (path, action.dest)
        if path:
            assert sub.description, path


def test_every_help_says_where_configuration_comes_from_and_fits_80_columns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`audit verify --help` and `erasure check --help` had no word of DATABASE_URL, and
    descriptions ran on one line of 150 characters: every command's help, down to each
    subcommand, ends with the environment table and wraps to the terminal."""
    monkeypatch.setenv("COLUMNS", "80")
    for path, sub in _walk(cli.build_parser()):
        text = sub.format_help()
        assert text.rstrip().endswith(cli.ENVIRONMENT.rstrip()), path
        long = [line for line in text.splitlines() if len(line) > 80]
        assert not long, (path, long)


@pytest.mark.parametrize("group", [["keys"], ["audit"], ["erasure"], []])
def test_a_command_group_without_its_subcommand_lists_them(
    group: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`contact-deletion keys` said only "required: SUBCOMMAND": it shows the group's
    help (every subcommand with its summary), then the error, exit 2."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(group)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    expected = {"keys": "revoke", "audit": "verify-export", "erasure": "check"}
    assert (expected[group[0]] if group else "migrate") in err, err
    assert err.rstrip().endswith("COMMAND"), err


def test_every_json_option_says_the_one_document_it_prints() -> None:
    """`dlq list --json` was "one JSON object per dead letter" (nothing when none) beside
    `keys list --json`'s array: every --json prints one document, an array for a listing
    (saying what an empty one prints) or an object for one result, and the root help says
    the rule and where errors go."""
    parser = cli.build_parser()
    shapes = {}
    for path, sub in _walk(parser):
        for action in sub._actions:
            if "--json" in action.option_strings:
                assert action.help is not None
                shapes[" ".join(path)] = action.help
    assert shapes == {
        "keys create": "print one JSON object",
        "keys list": "print one JSON array ([] when there are none)",
        "audit verify": "print one JSON array, an object per workspace ([] when there is none)",
        "audit verify-export": "print one JSON object",
        "erasure check": "print one JSON object",
        "dlq list": "print one JSON array ([] when there are none)",
    }
    root = " ".join(parser.format_help().split())
    assert "with --json, exactly one JSON document" in root
    assert "'contact-deletion: error: ...'" in root and "exits with 2" in root


def test_a_usage_error_is_the_one_error_line_of_every_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """argparse wrote "contact-deletion keys create: error: …", another prefix than the
    "contact-deletion: error: …" of every other refusal."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["keys", "create", "--workspace", "w", "--scope", "contacts:nuke"])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    usage, line = err.rstrip("\n").rsplit("\n", 1)
    assert out == "" and usage.startswith("usage: contact-deletion keys create"), err
    assert line.startswith("contact-deletion: error: keys create: argument --scope: "), err


def test_components_and_scopes_listed_by_the_cli_are_the_services() -> None:
    assert list(cli.COMPONENTS) == list(components())
    create = _subparsers(_subparsers(cli.build_parser())["keys"])["create"]
    scope = next(a for a in create._actions if a.dest == "scope")
    assert tuple(scope.choices or ()) == SCOPES


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("contact-deletion ") and out.split()[-1][0].isdigit()


def test_help_imports_none_of_the_service_s_heavy_dependencies() -> None:
    """`--help` parses before importing the database, Kafka or HTTP layers (it answered in
    about 3 s on a busy machine when it imported them all first)."""
    probe = (
        "import sys\n"
        "from service import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('sqlalchemy', 'aiohttp', 'aiokafka', 'alembic', 'structlog',"
        " 'pydantic') if m in sys.modules]\n"
        "sys.stderr.write(repr(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stderr.strip() == "[]"
    assert "keys" in done.stdout and "--version" in done.stdout


def test_the_default_database_does_not_depend_on_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("DATA_DIR", raising=False)
    here = Settings().database_url
    monkeypatch.chdir(tmp_path)
    assert Settings().database_url == here
    assert here == f"sqlite+aiosqlite:///{default_data_dir() / 'contact-deletion.db'}"
    assert default_data_dir().is_absolute()
    assert not (tmp_path / "data").exists()


def test_a_relative_data_dir_is_anchored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_DIR", "state")
    settings = Settings()
    assert settings.data_dir == tmp_path / "state"
    assert settings.database_url.endswith(f"{tmp_path}/state/contact-deletion.db")


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "list"],
        ["keys", "revoke", "00000000-0000-4000-8000-000000000001"],
        ["audit", "verify"],
        ["erasure", "check", "--email", "a@b.test"],
        ["worker"],
    ],
)
def test_a_command_without_a_database_names_the_file_and_creates_nothing(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """From another directory, with no database yet: one line naming the file and saying
    to run `migrate`, exit 2, and no empty database left behind."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "data" / "contact-deletion.db") in err
    assert "contact-deletion migrate" in err
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("address", ["not-an-email", "a@", "@b.test", "a b@c.test", ""])
def test_erasure_check_refuses_what_is_not_an_address_before_reading_anything(
    address: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A typo must not read as a proof: "verdict: nowhere", exit 0, for a string that could
    never have been stored. Refused with the API's reason, exit 2, before any database."""
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    code = cli.main(["erasure", "check", "--email", address])
    out, err = capsys.readouterr()
    assert code == 2
    assert "--email" in err and "not a valid email address" in err
    assert "verdict" not in out
    assert not (tmp_path / "data").exists()


def test_the_dev_banner_promises_to_stop_only_a_broker_it_started() -> None:
    from service.dev import _banner

    args = ("http://127.0.0.1:8081", "cdk_x", Path("data/demo-key"), False, "data/x.db")
    assert "(and the local broker)" in _banner(*args, owns_broker=True)
    assert "(and the local broker)" not in _banner(*args, owns_broker=False)


def test_dev_says_it_fetches_the_broker_jars_only_when_they_are_not_cached(
    tmp_path: Path,
) -> None:
    """`make dev` said "(first start fetches jars)" on every start, cached or not."""
    from service.dev import starting_broker
    from service.localkafka import KAFKA_VERSION, jars_cached

    assert not jars_cached(cache_dir=tmp_path)
    fresh = starting_broker("127.0.0.1", 9092, cached=jars_cached(cache_dir=tmp_path))
    assert fresh.endswith("(fetching its jars from Maven Central first, once)"), fresh
    base = tmp_path / f"kafka-{KAFKA_VERSION}"
    (base / "libs").mkdir(parents=True)
    assert not jars_cached(cache_dir=tmp_path)  # a fetch cut short is not a cache
    (base / "libs.complete").touch()
    assert jars_cached(cache_dir=tmp_path)
    cached = starting_broker("127.0.0.1", 9092, cached=jars_cached(cache_dir=tmp_path))
    assert cached == "starting a local Apache Kafka broker on 127.0.0.1:9092", cached
