"""``fhirmatch evaluate`` for scripts: exit codes, problems in the output and once on stderr,
``--output``, progress and summary on stderr, a closed pipe, grouping single-resource files."""

from __future__ import annotations

import json
import os
import pty
import stat
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from fhirmatch.cli import main
from fhirmatch.cli.evaluate import format_table
from fhirmatch.cli.exitcodes import BROKEN_PIPE
from fhirmatch.results import TrialResult

REPO = Path(__file__).resolve().parents[2]
TRIALS = str(REPO / "fixtures" / "trials")
PATIENTS = REPO / "fixtures" / "patients"
ELIGIBLE = PATIENTS / "demo-escc-eligible.json"
AS_OF = "2026-11-01"


def evaluate(*args: str) -> list[str]:
    return ["evaluate", "--trials", TRIALS, "--as-of", AS_OF, *args]


def cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fhirmatch", *evaluate(*args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        **kw,  # type: ignore[call-overload]
    )


def _bad_export(tmp_path: Path) -> Path:
    """The eligible demo patient as NDJSON plus one broken line and one orphan resource."""
    bundle = json.loads(ELIGIBLE.read_text(encoding="utf-8"))
    lines = [json.dumps(e["resource"]) for e in bundle["entry"]]
    lines.insert(1, '{"resourceType": "Observation", "id": "broken"')
    lines.append(json.dumps({"resourceType": "Observation", "id": "orphan", "status": "final"}))
    path = tmp_path / "export.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_missing_patients_path_exits_2_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    code = main(evaluate("--patients", str(ELIGIBLE), str(tmp_path / "nope"), "--output", str(out)))
    _, err = capsys.readouterr()
    assert code == 2
    assert err.strip() == f"fhirmatch: --patients {tmp_path / 'nope'}: no such file or directory"
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_patients_path_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(ELIGIBLE.read_bytes())
    path.chmod(0)
    assert main(evaluate("--patients", str(path))) == 2


@pytest.mark.parametrize("content", ["", "\n\n", '{"resourceType": "Organization", "id": "o"}'])
def test_input_without_a_patient_exits_2_and_writes_nothing(
    tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "in.json"
    path.write_text(content, encoding="utf-8")
    out = tmp_path / "out.json"
    code = main(evaluate("--patients", str(path), "--format", "json", "--output", str(out)))
    _, err = capsys.readouterr()
    assert code == 2
    assert err.splitlines()[-1] == "fhirmatch: no patients found in --patients"
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_a_clean_run_exits_0_with_a_summary_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(evaluate("--patients", str(PATIENTS), "--format", "json"))
    out, err = capsys.readouterr()
    assert code == 0
    report = json.loads(out)
    assert report["problems"] == []
    n = len({r["patient"] for r in report["results"]})
    counts = {s: sum(r["status"] == s for r in report["results"]) for s in ("eligible",)}
    *warnings, summary = err.splitlines()
    assert all(w.startswith("fhirmatch: warning: ") for w in warnings)  # incomplete definitions
    assert summary.startswith(f"fhirmatch: evaluated {n} patients against 5 trials in ")
    assert f"{counts['eligible']} eligible" in summary and "problem" not in summary


@pytest.mark.parametrize("fmt", ["json", "ndjson", "table"])
def test_skipped_input_exits_1_lists_problems_in_output_and_once_on_stderr(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    export = _bad_export(tmp_path)
    code = main(evaluate("--patients", str(export), "--format", fmt))
    out, err = capsys.readouterr()
    assert code == 1
    broken = f"{export}: line 2 is not valid JSON; line skipped"
    orphan = "(Observation/orphan) has no patient reference"
    assert err.count(broken) == 1 and err.count(orphan) == 1
    assert "2 problems (input skipped)" in err.splitlines()[-1]
    if fmt == "json":
        problems = json.loads(out)["problems"]
        assert problems[0] == broken and orphan in problems[1] and len(problems) == 2
    elif fmt == "ndjson":
        lines = [json.loads(line) for line in out.splitlines()]
        problems = [x["problem"] for x in lines if "problem" in x]
        assert problems[0] == broken and orphan in problems[1] and len(problems) == 2
        assert {x["patient"] for x in lines if "patient" in x} == {"Patient/demo-escc-eligible"}
    else:
        assert f"! {broken}" in out


def test_problems_once_on_stderr_with_worker_processes(tmp_path: Path) -> None:
    """Grouped by the workers (tiny partitions): each problem still printed once."""
    export = _bad_export(tmp_path)
    proc = cli(
        "--patients",
        str(export),
        "--format",
        "ndjson",
        "--executor",
        "processes",
        "--workers",
        "2",
        "--partition-mb",
        "0.001",
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("line 2 is not valid JSON") == 1
    assert proc.stderr.count("Observation/orphan") == 1
    assert "Traceback" not in proc.stderr


def test_output_file_is_owner_only_and_holds_what_stdout_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.ndjson"
    assert main(evaluate("--patients", str(PATIENTS), "--format", "ndjson")) == 0
    expected, _ = capsys.readouterr()
    assert (
        main(evaluate("--patients", str(PATIENTS), "--format", "ndjson", "--output", str(out))) == 0
    )
    printed, err = capsys.readouterr()
    assert printed == ""
    assert out.read_text(encoding="utf-8") == expected
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["results.ndjson"]  # no temporary left
    assert err.splitlines()[-1].startswith("fhirmatch: evaluated")


def test_output_into_a_missing_directory_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "dir.json"
    assert main(evaluate("--patients", str(ELIGIBLE), "--output", str(out))) == 2


def test_a_closed_pipe_stops_quietly() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhirmatch",
            *evaluate("--patients", str(PATIENTS), "--format", "ndjson"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # like `| head -1`: one line, then the reader goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=300) == BROKEN_PIPE
    assert json.loads(first)["patient"]
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_progress_on_a_terminal(tmp_path: Path) -> None:
    """stderr a terminal and the results in a file: a progress line, then the summary."""
    main_fd, term_fd = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fhirmatch",
                *evaluate("--patients", str(PATIENTS), "--output", str(tmp_path / "o.txt")),
            ],
            stderr=term_fd,
            stdout=subprocess.DEVNULL,
            cwd=REPO,
            timeout=300,
        )
        os.close(term_fd)
        term_fd = -1
        seen = b""
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(main_fd)
        if term_fd >= 0:
            os.close(term_fd)
    assert proc.returncode == 0
    text = seen.decode()
    assert "\rfhirmatch evaluate: 1 patients" in text
    assert "\r\033[Kfhirmatch: evaluated 21 patients" in text  # the progress line cleared


def test_single_resource_files_are_grouped_by_patient(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder with one resource per file, as implementation guides ship examples, is one
    patient, evaluated once, exactly as the same resources in one Bundle."""
    bundle = json.loads(ELIGIBLE.read_text(encoding="utf-8"))
    folder = tmp_path / "examples"
    folder.mkdir()
    for n, entry in enumerate(bundle["entry"]):
        res = entry["resource"]
        (folder / f"{res['resourceType']}-{n:03d}.json").write_text(
            json.dumps(res, indent=2), encoding="utf-8"
        )
    assert main(evaluate("--patients", str(ELIGIBLE), "--format", "json")) == 0
    from_bundle = json.loads(capsys.readouterr()[0])["results"]
    assert main(evaluate("--patients", str(folder), "--format", "json")) == 0
    from_files = json.loads(capsys.readouterr()[0])["results"]
    assert len(bundle["entry"]) > 5
    assert len(from_files) == 5  # one patient, five trials: not one fragment per file
    assert from_files == from_bundle


def test_table_wraps_long_titles_at_word_boundaries() -> None:
    title = (
        "Salvage Chemoradiation Therapy for Recurrence After Radical Surgery or Palliative "
        "Surgery in Esophageal Cancer Patients With Extraordinarily Long Trial Titles"
    )
    result = TrialResult(
        patient="Patient/p1", study="ResearchStudy/NCT0", status="eligible", title=title
    )
    text = format_table([result], date(2026, 11, 1), [])
    title_lines = text.splitlines()[1:-1]
    assert title_lines.pop() == "    status: ELIGIBLE"
    assert len(title_lines) > 1
    words = " ".join(line.strip() for line in title_lines).split()
    assert words == ["ResearchStudy/NCT0", *title.split()]
    assert all(len(line) <= 96 for line in title_lines)


def test_result_json_writes_any_text_as_pydantic_does() -> None:
    """Quotes, backslashes, control characters, non-ASCII and astral characters, None and
    nested results: the same bytes as ``model_dump_json``."""
    from fhirmatch.results import CriterionResult, result_json

    odd = 'a\x00\x1f\x7f"\\/\n\r\t\b\f é 中 \u2028 \U0001f600 <>&'
    child = CriterionResult(id="c", kind="exclusion", text=odd, outcome="unknown", reason=odd)
    group = CriterionResult(
        id="g", kind="inclusion", text="t", outcome="pass", evidence=[odd], criteria=[child]
    )
    result = TrialResult(
        patient=f"Patient/{odd}", study="ResearchStudy/s", status="eligible", criteria=[group]
    )
    assert result_json(result) == result.model_dump_json().encode("utf-8")
    with pytest.raises(TypeError):
        result_json({"not": object()})  # type: ignore[arg-type]


def test_ndjson_goes_to_a_text_stream_without_a_buffer_and_after_text(tmp_path: Path) -> None:
    import io

    from fhirmatch.cli.evaluate import _bytes_writer

    text = io.StringIO()
    _bytes_writer(text)("é\n".encode())
    assert text.getvalue() == "é\n"
    with (tmp_path / "out").open("w", encoding="utf-8") as fh:
        fh.write("first ")  # held by the text layer: must come out before the bytes
        _bytes_writer(fh)("é\n".encode())
    assert (tmp_path / "out").read_text("utf-8") == "first é\n"


def test_a_lone_surrogate_in_the_input_is_reported_and_the_run_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``"\\udc80"`` parses as JSON but cannot be written out as text: that line (or Bundle) is
    skipped with a problem naming it, and every other patient is screened."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "Patient.ndjson").write_text(
        '{"resourceType": "Patient", "id": "bad\\udc80", "birthDate": "1960-01-01"}\n'
        '{"resourceType": "Patient", "id": "good", "birthDate": "1960-01-01"}\n',
        encoding="utf-8",
    )
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": []}
    (folder / "b.json").write_text(json.dumps(bundle)[:-1] + ', "x": "\\ud800"}', encoding="utf-8")
    code = main(
        ["evaluate", "--trials", str(TRIALS), "--patients", str(folder), "--format", "ndjson"]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    problems = sorted(r["problem"] for r in rows if "problem" in r)
    assert problems == [
        f"{folder / 'Patient.ndjson'}: line 1 holds a \\u escape of a lone surrogate, which is "
        "not Unicode text; line skipped",
        f"{folder / 'b.json'}: holds a \\u escape of a lone surrogate, which is not Unicode "
        "text; file skipped",
    ]
    assert {r["patient"] for r in rows if "patient" in r} == {"Patient/good"}
