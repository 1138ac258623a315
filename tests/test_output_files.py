"""The files cvt writes: a run stopped by SIGTERM or Ctrl-C still leaves a readable file (parquet
too), one killed outright leaves whole lines; temporary names stay within a file name's 255
bytes; a replaced file keeps its permission bits; CSV cells a spreadsheet would run are
neutralised; text a strict UTF-8 stdout cannot take still goes out; an OpenVINO export to
another file system works, and a failed one leaves no folder behind."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import cvt
from cvt import cli, files
from cvt.engines import export
from cvt.predict import FORMULA_START

from conftest import randomise_, save_tiny_classifier, start_with_a_slow_file, tiny_config, write_images


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("model") / "model")


def classify(model_dir: Path, photos: Path, *options: str) -> list[str]:
    return ["predict", str(model_dir), str(photos), "--engine", "torch", *options]


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    with open(path, "rb") as f:  # pyarrow opens only names that are UTF-8
        return pq.read_table(f).to_pylist()


# ------------------------------------------------------------------------------ stopped runs
@pytest.mark.subprocess
@pytest.mark.parametrize("fmt, stop", [("parquet", signal.SIGTERM), ("parquet", signal.SIGINT),
                                       ("jsonl", signal.SIGKILL)])
def test_a_stopped_run_leaves_what_it_finished_readable(tmp_path, model_dir, fmt, stop) -> None:
    """SIGTERM and Ctrl-C stop `cvt predict` with the finished rows written as a complete file at
    the name given (a parquet file's footer included); SIGKILL, which no process can catch,
    leaves whole lines of JSON in the temporary file named on stderr."""
    photos = write_images(tmp_path / "photos", count=3)
    write_images(tmp_path / "photos" / "zz", count=1)  # sorted last
    (slow,) = (tmp_path / "photos" / "zz").rglob("*.png")
    slow.rename(slow.with_name("slow.png"))
    output = tmp_path / "out" / f"results.{fmt}"
    process, _ = start_with_a_slow_file(tmp_path, classify(model_dir, photos, "--format", fmt, "--output",
                                                           str(output), "--batch-size", "1"))
    process.send_signal(stop)
    _, err = process.communicate(timeout=30)
    if stop == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL and not output.exists()
        temporary = Path(err.split("cvt: writing to ")[1].split(" (renamed")[0])
        assert files.temporary_of(temporary.name) == output.name
        lines = temporary.read_text(encoding="utf-8").splitlines()
        assert 1 <= len(lines) <= 3 and all(json.loads(line)["labels"] for line in lines)
        return
    assert process.returncode == 130, err
    finished = int(err.split("interrupted after ")[1].split()[0])
    rows = read_parquet(output)
    assert 1 <= finished <= 3 and len(rows) == finished, err
    assert all(len(row["labels"]) == 5 and row["error"] is None for row in rows)
    assert [p.name for p in output.parent.iterdir()] == [output.name]  # no temporary file left


# ------------------------------------------------------------------------------ names and modes
def test_a_246_character_output_name_is_written(tmp_path, model_dir, capsys) -> None:
    photos = write_images(tmp_path / "photos", count=1)
    output = tmp_path / ("r" * 240 + ".jsonl")
    assert len(output.name) == 246
    assert cli.main(classify(model_dir, photos, "--format", "jsonl", "--output", str(output))) == 0
    assert len(output.read_text().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [output.name]


def test_temporary_names_fit_a_file_name_and_short_ones_name_their_target(tmp_path) -> None:
    longest = "é" * 127 + "x"  # 255 bytes in UTF-8, the most a file name holds
    for name in (longest, "a" * 255, "model.safetensors"):
        temporary = files.temporary_name(name)
        assert len(os.fsencode(temporary)) <= files.NAME_MAX and files.temporary_of(temporary) is not None
        files.write_bytes(tmp_path / name, b"data")
        assert (tmp_path / name).read_bytes() == b"data"
    assert files.temporary_of(files.temporary_name("training_state.pt")) == "training_state.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([longest, "a" * 255, "model.safetensors"])


def test_a_replaced_file_keeps_its_permission_bits(tmp_path, model_dir, capsys) -> None:
    private = tmp_path / "private.json"
    private.write_text("{}")
    private.chmod(0o600)
    files.write_json(private, {"a": 1})
    assert (private.stat().st_mode & 0o777, json.loads(private.read_text())) == (0o600, {"a": 1})
    shared = tmp_path / "shared.jsonl"
    shared.write_text("")
    shared.chmod(0o664)
    photos = write_images(tmp_path / "photos", count=1)
    assert cli.main(classify(model_dir, photos, "--format", "jsonl", "--output", str(shared))) == 0
    assert shared.stat().st_mode & 0o777 == 0o664
    fresh = tmp_path / "fresh.bin"
    files.write_bytes(fresh, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file: as open() makes it


def test_folders_made_for_a_failed_write_are_removed(tmp_path) -> None:
    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space"):
        files.write_atomic(tmp_path / "new" / "deeper" / "out.json", fail)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ CSV and text
def undo_formula_quote(cell: str) -> str:
    """The documented way back: a cell starting with `'` followed (after any quotes) by a
    formula character had one quote added."""
    return cell[1:] if cell.startswith("'") and cell.lstrip("'").startswith(FORMULA_START) else cell


def test_csv_cells_a_spreadsheet_would_run_get_a_leading_quote(tmp_path, capsys) -> None:
    labels = {0: '=HYPERLINK("http://x","y")', 1: "+1", 2: "-2", 3: "@SUM(A1)", 4: "\tcmd",
              5: "\rcmd", 6: "'=already quoted", 7: "'s-Hertogenbosch"}
    model = randomise_(cvt.CvtForImageClassification(tiny_config(id2label=labels, num_labels=8)), 2)
    model.save_pretrained(tmp_path / "m")
    cvt.CvtImageProcessor(size=64).save_pretrained(tmp_path / "m")
    photos = write_images(tmp_path / "photos", count=1)
    assert cli.main(classify(tmp_path / "m", photos, "--format", "csv", "--top-k", "8")) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out, newline="")))
    written = {row["label"] for row in rows}
    assert not any(cell.startswith(FORMULA_START) for row in rows for cell in row.values())
    assert {"'=HYPERLINK(\"http://x\",\"y\")", "'+1", "'-2", "'@SUM(A1)", "'\tcmd", "'\rcmd",
            "''=already quoted", "'s-Hertogenbosch"} == written
    assert {undo_formula_quote(cell) for cell in written} == set(labels.values())
    assert cli.main(classify(tmp_path / "m", photos, "--format", "jsonl", "--top-k", "8")) == 0
    assert set(json.loads(capsys.readouterr().out)["labels"]) == set(labels.values())  # JSON: as they are


def odd_model_and_photo(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A model with a lone surrogate in a label and a folder holding one image whose name is
    Latin-1 bytes (not UTF-8); (model folder, photos folder, the name's bytes)."""
    labels = {0: "half \ud83d emoji", 1: "b", 2: "c", 3: "d", 4: "e"}
    model = randomise_(cvt.CvtForImageClassification(tiny_config(id2label=labels)), 2)
    model.save_pretrained(tmp_path / "m")
    cvt.CvtImageProcessor(size=64).save_pretrained(tmp_path / "m")
    photos = write_images(tmp_path / "photos", count=1)
    (image,) = photos.rglob("*.png")
    name = b"caf\xe9.png"
    os.rename(image, os.fsencode(photos) + b"/" + name)
    return tmp_path / "m", photos, name


@pytest.mark.parametrize("fmt", ["table", "csv", "jsonl", "json"])
def test_every_format_survives_a_strict_utf8_stdout(tmp_path, monkeypatch, fmt) -> None:
    model, photos, name = odd_model_and_photo(tmp_path)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli.main(classify(model, photos, "--format", fmt)) == 0
    stdout.flush()
    out = stdout.buffer.getvalue()
    assert stdout.errors == "strict"  # as it was
    if fmt in ("table", "csv"):  # the name's own bytes, as in a --output file
        assert name in out and b"half \\ud83d emoji" in out
    else:  # JSON escapes both
        assert b"caf\\udce9.png" in out and b"half \\ud83d emoji" in out


@pytest.mark.subprocess
def test_a_latin1_name_and_a_surrogate_label_on_a_strict_stdout_exit_0(tmp_path) -> None:
    model, photos, name = odd_model_and_photo(tmp_path)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict",
           "PYTHONPATH": str(Path(cvt.__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "cvt", *classify(model, photos)]
    table = subprocess.run(command, env=env, capture_output=True, timeout=300)
    assert table.returncode == 0 and name in table.stdout and b"\\ud83d" in table.stdout, table.stderr
    output = os.fsencode(tmp_path) + b"/r\xe9sultats.parquet"
    stored = subprocess.run(command + ["--format", "parquet", "--output", os.fsdecode(output)], env=env,
                            capture_output=True, timeout=300)
    assert stored.returncode == 0 and output in stored.stdout, stored.stderr
    (row,) = read_parquet(Path(os.fsdecode(output)))
    assert row["path"].endswith("caf\\xe9.png") and "half \\ud83d emoji" in row["labels"]


# ------------------------------------------------------------------------------ OpenVINO export
@pytest.mark.slow
def test_openvino_export_to_another_file_system_and_a_failed_one_leaves_nothing(
        tmp_path, model_dir, monkeypatch, capsys) -> None:
    """A rename between file systems fails (EXDEV): the export stages its files beside the
    target, so it works on any file system; folders it made for a failed export are removed,
    and files it replaces keep their permission bits."""
    mount = tmp_path / "other-file-system"
    mount.mkdir()
    rename = os.replace

    def replace(source, target, **kwargs):
        if (mount in Path(source).parents) != (mount in Path(target).parents):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(source), None, str(target))
        return rename(source, target, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    xml = mount / "new" / "deeper" / "cvt.xml"
    export_openvino = ["export", str(model_dir), str(xml), "--format", "openvino"]
    assert cli.main(export_openvino) == 0
    assert sorted(p.name for p in xml.parent.iterdir()) == ["cvt.bin", "cvt.xml"]
    for path in (xml, xml.with_suffix(".bin")):
        path.chmod(0o600)
    assert cli.main(export_openvino) == 0
    assert [p.stat().st_mode & 0o777 for p in (xml, xml.with_suffix(".bin"))] == [0o600, 0o600]

    def fail(*args):
        raise export.ExportCheckError("differs")

    monkeypatch.setattr(export, "_check_openvino", fail)
    assert cli.main(["export", str(model_dir), str(mount / "fresh" / "x.xml"), "--format", "openvino"]) == 1
    assert sorted(p.name for p in mount.iterdir()) == ["new"]
