"""`radflow ingest DIR`: every file tried, a report even when some fail, and an exit status
that tells a partly refused folder (3) from a clean one (0)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_inputs import changed, failing_unforeseen
from factories import dicom_bytes

from cli.ingest import EXIT_REJECTED
from cli.main import main
from radflow.settings import Settings


def test_ingest_reports_refused_files_and_exits_3(
    flow_env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(dicom_bytes())
    (folder / "b-deflate.dcm").write_bytes(failing_unforeseen()["deflate.dcm"])
    (folder / "c.txt").write_bytes(b"minutes of the meeting")
    (folder / "d.dcm").write_bytes(
        changed(dicom_bytes(), lambda ds: setattr(ds, "StudyDescription", "CHEST\0PA"))
    )

    assert main(["ingest", str(folder)]) == EXIT_REJECTED == 3
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "stored 2, duplicates 0, rejected 2, stable studies 2"
    assert any(line.startswith(f"  rejected {folder / 'b-deflate.dcm'}: un") for line in out)
    assert f"  rejected {folder / 'c.txt'}: not-dicom: c.txt: not a DICOM file" in "\n".join(out)
    assert f"  stored {folder / 'd.dcm'} without: study_description contains a NUL" in "\n".join(
        out
    )

    (folder / "b-deflate.dcm").unlink()
    (folder / "c.txt").unlink()
    assert main(["ingest", str(folder)]) == 0
    assert capsys.readouterr().out.startswith("stored 0, duplicates 2, rejected 0")
