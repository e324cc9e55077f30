"""The --config file is checked against the flags' own types, choices and ranges: a wrong value
exits 2 naming the key, the value and what is expected, before any request is sent."""

from __future__ import annotations

import argparse
import datetime as dt
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fhirmatch.cli import build_parser, main
from fhirmatch.cli.config import config_schema, load_config
from fhirmatch.errors import ConfigurationError
from fhirmatch.options import positive_int

REPO = Path(__file__).resolve().parents[2]


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]  # type: ignore[index,no-any-return]


def _load(tmp_path: Path, text: str, command: str = "match") -> dict[str, object]:
    cfg = tmp_path / "fhirmatch.toml"
    cfg.write_text(text, encoding="utf-8")
    return load_config(cfg, _subparser(command))


def _refused(tmp_path: Path, text: str, command: str = "match") -> str:
    with pytest.raises(ConfigurationError) as exc:
        _load(tmp_path, text, command)
    message = str(exc.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ the schema


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('allow-insecure-http = "false"\n', 'allow-insecure-http = "false"', "true or false"),
        ('dry-run = "false"\n', 'dry-run = "false"', "true or false"),
        ('dry-run = "true"\n', 'dry-run = "true"', "true or false"),
        ("dry-run = 0\n", "dry-run = 0", "true or false"),
        ('format = "xml"\n', 'format = "xml"', 'one of "table", "json"'),
        ('auth = "kerberos"\n', 'auth = "kerberos"', '"bearer"'),
        ("retries = 0\n", "retries = 0", "an integer >= 1"),
        ('retries = "5"\n', 'retries = "5"', "an integer >= 1"),
        ("retries = 2.5\n", "retries = 2.5", "an integer >= 1"),
        ("retries = true\n", "retries = true", "an integer >= 1"),
        ("timeout = -1\n", "timeout = -1", "a number > 0"),
        ("chunk-size = 0\n", "chunk-size = 0", "an integer >= 1"),
        ("partition-mb = 0\n", "partition-mb = 0", "a number > 0"),
        ("workers = 0\n", "workers = 0", "an integer >= 1"),
        ("server = 8080\n", "server = 8080", "a string"),
        ('as-of = "yesterday"\n', 'as-of = "yesterday"', "a date YYYY-MM-DD"),
        ("trials = [1, 2]\n", "trials = [1, 2]", "a list of paths"),
        ("trials = []\n", "trials = []", "a list of paths"),
    ],
)
def test_a_wrong_value_names_key_value_and_expected(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    message = _refused(tmp_path, text)
    assert key in message
    assert expected in message
    assert "fhirmatch.toml" in message


def test_listen_config_is_checked_by_its_own_flags(tmp_path: Path) -> None:
    assert "port = 70000" in _refused(tmp_path, "port = 70000\n", "listen")
    assert "an integer >= 0 and <= 65535" in _refused(tmp_path, "port = 70000\n", "listen")
    # a match-only flag is not a listen key
    assert "unknown key 'chunk-size'" in _refused(tmp_path, "chunk-size = 5\n", "listen")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    message = _refused(tmp_path, 'dry-run = "false"\nformat = "xml"\nretries = 0\n')
    for key in ("dry-run", "format", "retries"):
        assert key in message


def test_good_values_come_out_typed(tmp_path: Path) -> None:
    values = _load(
        tmp_path,
        'server = "http://127.0.0.1:1/fhir"\n'
        "dry-run = true\n"
        "allow-insecure-http = false\n"
        'format = "json"\n'
        "retries = 3\n"
        "timeout = 30\n"  # an integer is a fine number of seconds
        'trials = "fixtures/trials"\n'  # one path for a list
        "as-of = 2026-11-01\n"  # a TOML date
        'state = "state.json"\n',
    )
    assert values == {
        "server": "http://127.0.0.1:1/fhir",
        "dry_run": True,
        "allow_insecure_http": False,
        "format": "json",
        "retries": 3,
        "timeout": 30,
        "trials": [Path("fixtures/trials")],
        "as_of": dt.date(2026, 11, 1),
        "state": Path("state.json"),
    }
    assert _load(tmp_path, 'as-of = "2026-11-01"\n') == {"as_of": dt.date(2026, 11, 1)}
    assert _load(tmp_path, "log_format = 'json'\n") == {"log_format": "json"}


def test_a_flag_added_to_a_command_is_checked_in_the_file_without_more_code(
    tmp_path: Path,
) -> None:
    parser = _subparser("match")
    parser.add_argument("--burst-size", type=positive_int, default=4)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--color", action=argparse.BooleanOptionalAction, default=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text("burst-size = 0\n")
    with pytest.raises(ConfigurationError, match=r"burst-size = 0 .*an integer >= 1"):
        load_config(cfg, parser)
    cfg.write_text('fast = "no"\n')
    with pytest.raises(ConfigurationError, match=r'fast = "no" .*true or false'):
        load_config(cfg, parser)
    cfg.write_text('color = "false"\n')
    with pytest.raises(ConfigurationError, match=r'color = "false" .*true or false'):
        load_config(cfg, parser)
    cfg.write_text("burst-size = 8\nfast = true\ncolor = false\n")
    assert load_config(cfg, parser) == {"burst_size": 8, "fast": True, "color": False}


@pytest.mark.parametrize("value", [0, 65])
def test_concurrency_out_of_range_in_the_file_is_refused(tmp_path: Path, value: int) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"concurrency = {value}\n")
    with pytest.raises(ConfigurationError, match=rf"concurrency = {value} .*>= 1 and <= 64"):
        load_config(cfg, _subparser("match"))


@pytest.mark.parametrize("command", ["match", "listen", "trials publish"])
def test_every_long_flag_is_a_key(command: str) -> None:
    if command == "trials publish":
        trials = _subparser("trials")
        sub = next(a for a in trials._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices["publish"]
    else:
        parser = _subparser(command)
    fields = {f.alias for f in config_schema(parser).model_fields.values()}
    flags = {
        o[2:]
        for a in parser._actions
        for o in a.option_strings[:1]
        if o.startswith("--") and a.dest not in ("help", "config")
    }
    assert flags and flags == fields


# ------------------------------------------------------------------------------ the command


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that records every request (as a FHIR server or as a proxy)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(f"{self.command} {self.path}")
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("line", "server", "expected"),
    [
        # the string was read as true: plain http to a non-loopback host (here through a proxy
        # that records what would have gone out)
        ('allow-insecure-http = "false"', "http://fhir.example.org/r4", "true or false"),
        # the string was read as true: a dry run
        ('dry-run = "false"', None, "true or false"),
        # the choice was not checked: the table instead
        ('format = "xml"', None, 'one of "table", "json"'),
    ],
)
def test_match_refuses_the_file_before_any_request(
    tmp_path: Path,
    recorder: tuple[str, list[str]],
    line: str,
    server: str | None,
    expected: str,
) -> None:
    url, seen = recorder
    cfg = tmp_path / "match.toml"
    cfg.write_text(
        f'server = "{server or url + "/fhir"}"\ntrials = ["{REPO / "fixtures" / "trials"}"]\n'
        f'state = "{tmp_path / "state.json"}"\n{line}\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HTTP_PROXY=url, http_proxy=url)
    proc = subprocess.run(
        [sys.executable, "-m", "fhirmatch", "match", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1, proc.stderr
    assert line in err[0] and expected in err[0]
    assert seen == []
    assert not (tmp_path / "state.json").exists()


def test_a_flag_on_the_command_line_still_wins(tmp_path: Path) -> None:
    cfg = tmp_path / "match.toml"
    cfg.write_text('format = "json"\nchunk-size = 7\n')
    parser = build_parser()
    argv = ["match", "--config", str(cfg), "--format", "table"]
    args = parser.parse_args(argv)
    args._parser.set_defaults(**load_config(cfg, args._parser))
    args = parser.parse_args(argv)
    assert (args.format, args.chunk_size) == ("table", 7)


def test_range_is_the_same_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["match", "--server", "http://127.0.0.1:1/fhir", "--retries", "0"])
    assert exc.value.code == 2
    assert "--retries: expected an integer >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["dry_run", "publish", "restart", "bulk"])
def test_library_options_refuse_a_string_for_a_boolean(name: str) -> None:
    from fhirmatch.listen import ListenOptions
    from fhirmatch.match import MatchOptions

    with pytest.raises(ConfigurationError, match=rf"MatchOptions.{name} must be True or False"):
        MatchOptions(**{name: "false"})  # type: ignore[arg-type]
    if name in ("dry_run", "publish"):
        with pytest.raises(ConfigurationError, match=rf"ListenOptions.{name} must be True"):
            ListenOptions(**{name: "false"})  # type: ignore[arg-type]
    assert getattr(MatchOptions(**{name: True}), name) is True
