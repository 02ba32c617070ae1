"""Outputs on a full (or read-only) file system: the real commands (cli.py) write into a small tmpfs.

Every output of ``predict`` (masks, saliency maps, PNGs, CSVs, index.html), ``evaluate``, ``convert`` and the
service is complete or absent under its final name; the failure is one line naming what could not be written
(predict: how many cases are done, that a rerun resumes), with no traceback; once there is room, a rerun
completes every case and the service answers again. SimpleITK's NIfTI writer gives no error on a full disk (it
leaves an empty or cut-off file): only the check before the rename (atomic.py) keeps such a file from its name.

Mounting a tmpfs needs root (CI runs as root); elsewhere the tests are skipped with the reason. Each test
unmounts what it mounted.
"""
import csv
import errno
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli import ours, run

PAGE = 4096  # tmpfs allocates whole pages
DISK_ERROR = "No space left on device"


@pytest.fixture
def small_disk(tmp_path):
    """``mount(path, kib, read_only=False)``: a tmpfs of ``kib`` KiB mounted at ``path`` (made if missing);
    every mount is undone when the test ends."""
    mounted = []

    def mount(path: Path, kib: int, read_only: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs the tests as root)")
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={kib}k" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        for path in reversed(mounted):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)  # still busy: detach it


def free_bytes(disk: Path) -> int:
    stat = os.statvfs(disk)
    return stat.f_bavail * stat.f_frsize


def fill(disk: Path, leave: int) -> Path:
    """A file that takes all of ``disk``'s free space but ``leave`` bytes (whole pages); remove it for room."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (free_bytes(disk) - leave))
    assert free_bytes(disk) == leave
    return filler


def the_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The one error line of a failed command (the last line of stderr; a progress bar may come before it)."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip()]
    errors = [line for line in lines if line.startswith(f"multitask-nnunet {command}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    return errors[0][len(f"multitask-nnunet {command}: error: "):]


def assert_outputs_load(folder: Path) -> list:
    """Every file under ``folder`` is complete and loads; no temporary file is left. Returns the file names."""
    from matplotlib.image import imread

    from multitask_nnunet.io.atomic import TEMPORARY_PREFIX
    from multitask_nnunet.io.nifti import check_complete, written_incompletely
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert not [n for n in names if n.startswith(TEMPORARY_PREFIX)], names
    for name in names:
        path = folder / name
        if name.endswith(".nii.gz"):
            check_complete(path)
            assert written_incompletely(path) is None, name
            assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).size > 0
        elif name.endswith(".png"):
            assert imread(path).ndim == 3, name
        elif name.endswith(".csv"):
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            assert rows and rows[0][:2] == ["Names", "Subtype"] and all(len(r) == len(rows[0]) for r in rows), name
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".html"):
            assert path.read_text().endswith("</html>\n"), name
    return names


def csv_names(path: Path) -> list:
    with open(path, newline="") as f:
        return [row["Names"] for row in csv.DictReader(f)]


def predict_cmd(trained, input_dir, output_dir, *extra) -> list:
    return ours("predict", "-i", input_dir, "-o", output_dir, "-m", trained.results, "--device", "cpu", *extra)


def test_atomic_nifti_write_on_full_disk(small_disk, tmp_path):
    """SimpleITK writes a cut-off or empty .nii.gz on a full disk without an error; through ``atomic_path`` the
    write is a WriteError (ENOSPC) naming the final file, whose name never appears, and no temporary is left.
    A text write fails the same way."""
    from damage import noisy_labels

    from multitask_nnunet.io.atomic import atomic_path, atomic_write_text
    from multitask_nnunet.errors import WriteError
    disk = small_disk(tmp_path / "disk", 64)
    image = sitk.GetImageFromArray(noisy_labels((40, 60, 60)))  # ~34 KB compressed: the second one does not fit
    written, failures = [], []
    for i in range(3):
        path = disk / f"mask_{i}.nii.gz"
        try:
            with atomic_path(str(path), suffix=".nii.gz") as tmp:
                sitk.WriteImage(image, tmp, True)
            written.append(path.name)
        except WriteError as e:
            failures.append(e)
            assert (e.path, e.errno, e.no_room) == (str(path), errno.ENOSPC, True)
            assert str(e).startswith(f"cannot write {path}: {DISK_ERROR} (the image writer gave no error, but its "
                                     f"file is incomplete: ") and "\n" not in str(e)
    assert written == ["mask_0.nii.gz"] and len(failures) == 2
    with pytest.raises(WriteError, match=f"^cannot write {re.escape(str(disk / 'big.csv'))}: {DISK_ERROR}$"):
        atomic_write_text(str(disk / "big.csv"), "x" * 100_000)
    assert assert_outputs_load(disk) == ["mask_0.nii.gz"]


def test_predict_full_disk_stops_in_one_line_and_resumes(trained, small_disk, tmp_path):
    """predict into a file system with room for a few masks, with --continue-on-error: it still stops at the
    first output that does not fit (every later case would fail alike), in one line that names the file and how
    many cases are done; every file left under its final name loads, each CSV row has its mask. With room again
    the same command predicts the rest: every case has its mask and a row in both CSVs."""
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (trained.source / "test").glob("*_0000.nii.gz"))
    disk = small_disk(tmp_path / "disk", 1024)
    out = disk / "out"
    filler = fill(disk, 5 * PAGE)  # the masks are about 2 KB: room for 2 or 3 cases with their CSVs
    result = run(predict_cmd(trained, trained.source / "test", out, "--continue-on-error"), trained.env,
                 check=False)
    line = the_error_line(result, "predict")
    match = re.fullmatch(rf"cannot write {re.escape(str(out))}/(\S+): {DISK_ERROR}.*; (\d+) of {len(cases)} "
                         rf"case\(s\) done; rerun the same command once there is room to resume with the other (\d+)",
                         line)
    assert match, line
    done = int(match[2])
    assert done < len(cases) and done + int(match[3]) == len(cases)
    names = assert_outputs_load(out)
    rows = csv_names(out / "class_probabilities.csv") if done else []
    assert len(rows) == done and all(r in names for r in rows)
    if done:
        assert csv_names(out / "subtype_results.csv")[:done] == rows

    filler.unlink()
    resumed = run(predict_cmd(trained, trained.source / "test", out), trained.env)
    assert resumed.stdout.startswith(f"{len(cases)} case(s): {len(cases) - done} to predict, {done} already done")
    names = assert_outputs_load(out)
    masks = [f"{c}.nii.gz" for c in cases]
    assert set(masks) <= set(names)
    assert csv_names(out / "class_probabilities.csv") == csv_names(out / "subtype_results.csv") == masks


def test_predict_saliency_full_disk(trained, small_disk, tmp_path):
    """--saliency on a file system that fills up within the first cases: its maps (hundreds of KB) are cut off
    by SimpleITK, yet no saliency map, pooling map, PNG or mask under its final name is incomplete; the failure
    is one line, and the rerun with room writes every output of every case and index.html."""
    images = sorted((trained.source / "test").glob("*_0000.nii.gz"))[:4]
    (tmp_path / "in").mkdir()
    for image in images:
        shutil.copy(image, tmp_path / "in" / image.name)
    cases = [p.name[:-len("_0000.nii.gz")] for p in images]
    disk = small_disk(tmp_path / "disk", 8192)
    out = disk / "out"
    filler = fill(disk, 150 * PAGE)  # a case's outputs take 0.2-0.9 MB: room for one or two
    result = run(predict_cmd(trained, tmp_path / "in", out, "--saliency"), trained.env, check=False)
    line = the_error_line(result, "predict")
    match = re.fullmatch(rf"cannot write {re.escape(str(out))}/\S+: {DISK_ERROR}.*; (\d+) of {len(cases)} case\(s\) "
                         rf"done; rerun the same command once there is room to resume with the other \d+", line)
    assert match and int(match[1]) < len(cases), line
    done = int(match[1])
    names = assert_outputs_load(out)
    for row in (csv_names(out / "class_probabilities.csv") if done else []):
        case = row[:-len(".nii.gz")]
        assert {row, f"{case}_saliency.nii.gz", f"{case}_saliency.png"} <= set(names)

    filler.unlink()
    run(predict_cmd(trained, tmp_path / "in", out, "--saliency"), trained.env)
    names = assert_outputs_load(out)
    for case in cases:
        assert {f"{case}.nii.gz", f"{case}_saliency.nii.gz", f"{case}_saliency.png"} <= set(names)
    assert "index.html" in names
    assert csv_names(out / "class_probabilities.csv") == [f"{c}.nii.gz" for c in cases]


def test_predict_read_only_output(trained, small_disk, tmp_path):
    """A read-only output folder: one line naming the first output and the file system's error, no output."""
    (tmp_path / "in").mkdir()
    image = sorted((trained.source / "test").glob("*_0000.nii.gz"))[0]
    shutil.copy(image, tmp_path / "in" / image.name)
    out = small_disk(tmp_path / "out", 64, read_only=True)
    result = run(predict_cmd(trained, tmp_path / "in", out), trained.env, check=False)
    line = the_error_line(result, "predict")
    assert re.fullmatch(rf"cannot write {re.escape(str(out))}/\S+: Read-only file system; 0 of 1 case\(s\) done; "
                        rf"rerun the same command to resume with the other 1", line), line
    assert not list(out.iterdir())


def test_evaluate_full_disk(preprocessed, small_disk, tmp_path):
    """evaluate --json into a full file system: one line naming the first file (the confusion matrix PNG), nothing
    written there; with room, the JSON and both PNGs are complete."""
    pred = tmp_path / "pred"
    shutil.copytree(preprocessed.source / "test_labels", pred)  # the ground truth as a perfect prediction
    (pred / "classes.csv").rename(pred / "subtype_results.csv")
    disk = small_disk(tmp_path / "disk", 256)
    filler = fill(disk, 0)
    cmd = ours("evaluate", "--pred", pred, "--gt", preprocessed.source / "test_labels", "--json",
               disk / "results" / "results.json", "--bootstrap", 0)
    line = the_error_line(run(cmd, {}, timeout=300, check=False), "evaluate")
    assert line == f"cannot write {disk / 'results' / 'confusion_matrix.png'}: {DISK_ERROR}"
    assert not list((disk / "results").iterdir())

    filler.unlink()
    run(cmd, {}, timeout=300)
    assert assert_outputs_load(disk / "results") == ["confusion_matrix.png", "results.json"]
    assert json.loads((disk / "results" / "results.json").read_text())["accuracy"] == 1.0


def test_convert_names_the_destination(preprocessed, small_disk, tmp_path):
    """convert into an nnUNet_raw too small for the dataset: one line naming the file that could not be written
    by its place in the dataset folder (not the source image it was copying), and nothing is left there."""
    raw = small_disk(tmp_path / "raw", 256)
    env = {**preprocessed.env, "nnUNet_raw": str(raw)}
    result = run(ours("convert", "-i", preprocessed.source, "-d", 503, "-n", "Full"), env, check=False)
    line = the_error_line(result, "convert")
    match = re.fullmatch(rf"cannot write {re.escape(str(raw))}/Dataset503_Full/(\S+): {DISK_ERROR}.*; nothing was "
                         rf"written", line)
    assert match, line
    assert str(preprocessed.source) not in line
    assert not list(raw.iterdir())  # no dataset, no hidden staging folder
    assert not list(Path(preprocessed.env["nnUNet_preprocessed"]).glob("*Dataset503_Full*"))


def test_serve_full_disk_answers_507_and_recovers(trained, small_disk, tmp_path):
    """The service's private folder on a full file system: an upload that does not fit, and a result (mask) that
    does not fit beside its upload, are each answered 507 with one line that names no server path; nothing of
    either is left; the failed result is one line in the server log, which has no traceback. With room again
    the same request succeeds and its mask downloads complete."""
    requests = pytest.importorskip("requests", reason="the serve test needs requests (pip install -e '.[test]')")
    for module in ("fastapi", "uvicorn", "python_multipart"):
        pytest.importorskip(module, reason='the serve test needs the serve extra: pip install -e ".[test]"')
    from test_serve import start_server

    disk = small_disk(tmp_path / "serve" / "tmp", 4096)  # the server's TMPDIR: its private folder goes there
    server = start_server(trained, tmp_path / "serve")
    case = sorted((trained.source / "test").glob("*_0000.nii.gz"))[0]
    try:
        filler = fill(disk, 0)
        answer = server.predict(case, headers={})
        assert answer.status_code == 507, answer.text
        assert answer.json()["detail"] == f"the server has no room to store the upload ({DISK_ERROR}); retry once " \
                                          f"it has"
        filler.unlink()

        filler = fill(disk, math.ceil(case.stat().st_size / PAGE) * PAGE)  # the upload fits, its mask does not
        answer = server.predict(case, headers={})
        assert answer.status_code == 507, answer.text
        detail = answer.json()["detail"]
        assert detail.startswith(f"the server has no room to store the result of case '{case.name[:-12]}' "
                                 f"({DISK_ERROR}") and "\n" not in detail and str(disk) not in detail, detail
        assert requests.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
        private = server.private()
        assert [p for p in private.rglob("*") if p.is_file()] == []  # no upload, no mask, no temporary file
        filler.unlink()

        answer = server.predict(case, headers={})
        assert answer.status_code == 200, answer.text
        mask = server.get(f"/predict/{answer.json()['id']}/mask", headers={})
        assert mask.status_code == 200
        (tmp_path / "mask.nii.gz").write_bytes(mask.content)
        assert assert_outputs_load(tmp_path) == ["mask.nii.gz"]
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.nii.gz"))).shape,
                              sitk.GetArrayFromImage(sitk.ReadImage(str(case))).shape)
    finally:
        assert server.stop() == 0
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert len([line for line in log.splitlines() if DISK_ERROR in line]) == 1, log[-3000:]
