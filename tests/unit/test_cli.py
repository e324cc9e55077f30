"""The command line: every subcommand exists and explains itself; bad input exits 2 in one line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fhirmatch.cli import SUBCOMMANDS, build_parser, main
from fhirmatch.cli.common import JsonFormatter
from fhirmatch.cli.config import load_config


def test_every_subcommand_is_installed() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(SUBCOMMANDS) <= set(sub.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fhirmatch {command}")
    assert len(out.splitlines()) > 3


def test_top_level_help_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fhirmatch", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in SUBCOMMANDS:
        assert command in out


@pytest.mark.parametrize(
    "argv",
    [
        ["no-such-command"],
        ["match", "--no-such-flag"],
        [
            "match",
            "--server",
            "http://127.0.0.1:1/fhir",
            "--trials",
            "fixtures/trials",
            "--as-of",
            "yesterday",
        ],
        [
            "match",
            "--server",
            "http://127.0.0.1:1/fhir",
        ],  # neither --trials nor --trials-from-server
        ["match", "--server", "http://fhir.example.org/r4", "--trials", "fixtures/trials"],
        [
            "match",
            "--server",
            "http://127.0.0.1:1/fhir",
            "--trials",
            "fixtures/trials",
            "--write",
            "everything",
        ],
        [
            "match",
            "--server",
            "http://127.0.0.1:1/fhir",
            "--trials",
            "fixtures/trials",
            "--auth",
            "bearer",
        ],
        ["evaluate", "--trials", "does-not-exist", "--patients", "fixtures/patients"],
        [
            "evaluate",
            "--trials",
            "fixtures/trials",
            "--patients",
            "fixtures/patients",
            "--spill-dir",
            "does-not-exist",
        ],
        ["evaluate", "--trials", "fixtures/trials", "--patients", "x", "--partition-mb", "0"],
        ["evaluate", "--trials", "fixtures/trials", "--patients", "x", "--workers", "0"],
        [
            "evaluate",
            "--trials",
            "fixtures/trials",
            "--patients",
            "x",
            "--scheduler",
            "tcp://127.0.0.1:1",
        ],
        ["sandbox", "--port", "99999"],
        [
            "match",
            "--server",
            "http://127.0.0.1:1/fhir",
            "--trials",
            "fixtures/trials",
            "--bulk",
            "--bulk-poll-max",
            "0",
        ],
        [
            "match",
            "--server",
            "http://127.0.0.1:1/fhir",
            "--trials",
            "fixtures/trials",
            "--concurrency",
            "0",
        ],
        [
            "match",
            "--server",
            "http://127.0.0.1:1/fhir",
            "--trials",
            "fixtures/trials",
            "--concurrency",
            "65",
        ],
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fhirmatch", *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "a reason must be printed"
    assert "Traceback" not in proc.stderr
    # argparse prints its usage line first; fhirmatch's own errors are one "fhirmatch: …" line
    # (trial definition errors then list each problem below it)
    reasons = [line for line in lines if line.startswith("fhirmatch")]
    assert len(reasons) == 1, proc.stderr
    assert len(reasons[0]) > len("fhirmatch: error: ")


def test_config_file_sets_defaults_and_flags_win(tmp_path: Path) -> None:
    cfg = tmp_path / "match.toml"
    cfg.write_text('server = "http://127.0.0.1:1/fhir"\nchunk-size = 7\nlog-format = "json"\n')
    parser = build_parser()
    args = parser.parse_args(["match", "--config", str(cfg), "--chunk-size", "9"])
    args._parser.set_defaults(**load_config(cfg, args._parser))
    args = parser.parse_args(["match", "--config", str(cfg), "--chunk-size", "9"])
    assert args.server == "http://127.0.0.1:1/fhir"
    assert args.log_format == "json"
    assert args.chunk_size == 9


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('token = "s3cret"\n', "secrets do not belong"),
        ('password = "s3cret"\n', "secrets do not belong"),
        ("no-such-key = 1\n", "unknown key"),
        ("server = \n", "not valid TOML"),
    ],
)
def test_bad_config_file_is_a_configuration_error(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    code = main(["match", "--config", str(cfg), "--trials", "fixtures/trials"])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "s3cret" not in err


def test_json_log_lines() -> None:
    record = logging.LogRecord(
        "fhirmatch.match", logging.INFO, __file__, 1, "screened %s", ("Patient/p1",), None
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "INFO"
    assert entry["logger"] == "fhirmatch.match"
    assert entry["message"] == "screened Patient/p1"


def test_evaluate_on_a_bulk_export_is_the_same_with_every_executor(tmp_path: Path) -> None:
    """The demo patients as a by-type NDJSON export; the process pool groups it itself (tiny
    partitions) and prints exactly what the local executor prints."""
    from fhirmatch.records import load_patient_records

    export = tmp_path / "export"
    export.mkdir()
    files: dict[str, list[str]] = {}
    for rec in load_patient_records(["fixtures/patients"]):
        for res in rec.resources:
            files.setdefault(res["resourceType"], []).append(json.dumps(res))
    for rtype, lines in files.items():
        (export / f"{rtype}.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def run(*extra: str) -> str:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fhirmatch",
                "evaluate",
                "--trials",
                "fixtures/trials",
                "--patients",
                str(export),
                "--as-of",
                "2026-11-01",
                "--format",
                "ndjson",
                "--partition-mb",
                "0.001",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    local = run()
    assert len({json.loads(line)["patient"] for line in local.splitlines()}) >= 20
    assert run("--executor", "processes", "--workers", "2") == local


def test_a_reader_that_goes_away_is_no_traceback() -> None:
    # `fhirmatch trials show ID | head -1`: the pipe is closed before fhirmatch writes
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhirmatch", "trials", "show", "NCT06767007"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141  # as a program stopped by SIGPIPE
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_the_demo_report_is_ignored_by_git() -> None:
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    demo = next(
        a
        for a in build_parser()._actions
        if a.dest == "command"  # the subcommands
    ).choices["demo"]  # type: ignore[index]
    default = next(a.default for a in demo._actions if a.dest == "report")
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", str(default)], cwd=repo, check=False
    )
    assert proc.returncode == 0, f"{default} is not in .gitignore"
