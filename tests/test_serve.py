"""``multitask-nnunet serve`` on the session's tiny trained model (conftest.py): a real server process on a free
loopback port, driven over real HTTP (requests): a good case against ``multitask-nnunet predict``, every kind of
bad input, the token rule, the full queue, the timeout, the private folder's cleanup; and the viewer page in a
real headless Chromium (Selenium), where one can be installed (``.ci/run`` installs Debian's)."""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli import ours, run

requests = pytest.importorskip("requests", reason="the serve tests need requests (pip install -e '.[test]')")
for module in ("fastapi", "uvicorn", "python_multipart"):
    pytest.importorskip(module, reason='the serve tests need the serve extra: pip install -e ".[test]"')

TOKEN = "test-token-5f2c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT_MB = 1  # the module server's upload limit: far above a synthetic case (~0.2 MB)
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or \
    "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    tmp: Path            # the server's TMPDIR: its private folder is made in there
    log: Path

    def private(self) -> Path:
        folders = list(self.tmp.glob("multitask-nnunet-serve-*"))
        assert len(folders) == 1, folders
        return folders[0]

    def predict(self, *files, names=None, headers=AUTH, **kwargs) -> "requests.Response":
        names = names or [Path(f).name for f in files]
        opened = [open(f, "rb") for f in files]
        try:
            return requests.post(f"{self.url}/predict", files=[("files", (n, f)) for n, f in zip(names, opened)],
                                 headers=headers, timeout=120, **kwargs)
        finally:
            for f in opened:
                f.close()

    def get(self, path, headers=AUTH, **kwargs) -> "requests.Response":
        return requests.get(f"{self.url}{path}", headers=headers, timeout=60, **kwargs)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(trained, root: Path, *extra, env=None) -> Server:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    port = free_port()
    log = root / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(ours("serve", "-m", trained.results, "--device", "cpu", "--port", port, *extra),
                                   env={**os.environ, **trained.env, "TMPDIR": str(tmp), **(env or {})}, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(f"http://127.0.0.1:{port}", process, tmp, log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{server.url}/health", timeout=5).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    server.stop()
    raise AssertionError(f"serve did not answer /health within 300 s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    from multitask_nnunet.serve.options import saliency_available
    server = start_server(trained, tmp_path_factory.mktemp("serve"), "--token", TOKEN, "--queue-size", "1",
                          "--max-upload-mb", LIMIT_MB, *(["--saliency"] if saliency_available() else []))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def case(trained) -> Path:
    return sorted((trained.source / "test").glob("*_0000.nii.gz"))[0]


@pytest.fixture(scope="module")
def cli_prediction(trained, case, tmp_path_factory):
    """``multitask-nnunet predict`` on the same one file: (mask, {class name: probability}, class name)."""
    root = tmp_path_factory.mktemp("serve_cli")
    shutil.copy(case, root / case.name)
    run(ours("predict", "-i", root, "-o", root / "out", "-m", trained.results, "--device", "cpu"), trained.env)
    name = case.name.replace("_0000.nii.gz", ".nii.gz")
    with open(root / "out" / "class_probabilities.csv", newline="") as f:
        row = next(csv.DictReader(f))
    with open(root / "out" / "subtype_results.csv", newline="") as f:
        subtype = list(csv.reader(f))[1]
    assert row["Names"] == subtype[0] == name
    probabilities = {k[len("prob_"):]: float(v) for k, v in row.items() if k.startswith("prob_")}
    return sitk.ReadImage(str(root / "out" / name)), probabilities, int(subtype[1])


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def assert_one_line_error(response, status, *words):
    assert response.status_code == status, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail, detail
    for word in words:
        assert word in detail, detail
    return detail


# ---------------------------------------------------------------- start-up, model, token
def test_health_model_and_token(server, trained):
    health = requests.get(f"{server.url}/health", timeout=10)   # no token needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert_one_line_error(server.get("/model", headers=headers), 401, "token")
        assert_one_line_error(server.get("/predict/0/mask", headers=headers), 401)
        assert server.get("/predict", headers=headers).status_code in (401, 405)
    assert_one_line_error(requests.post(f"{server.url}/predict", timeout=10), 401)
    model = server.get("/model").json()
    assert model == server.get(f"/model?token={TOKEN}", headers={}).json()
    dataset = json.loads((trained.results / "dataset.json").read_text())
    assert model["classes"] == dataset["classification"]["class_names"]
    assert model["labels"] == dataset["labels"] and model["regions"] is True  # the synthetic dataset's regions
    assert model["channels"] == dataset["channel_names"]
    assert model["folds"] == [0] and model["device"] == "cpu"
    assert model["plans"]["configuration"] == "3d_fullres" and model["plans"]["name"] == "nnUNetTinyPlans"
    assert model["version"]["nnunetv2"].startswith("2.") and model["service"]["queue_size"] == 1
    assert model["service"]["max_upload_bytes"] == LIMIT_MB * 2 ** 20
    assert oct(server.private().stat().st_mode & 0o777) == "0o700"
    # the page itself carries no data: served without the token
    page = requests.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and 'id="files"' in page.text and "://" not in page.text  # nothing from a CDN


def test_other_hosts_need_a_token(trained):
    result = run(ours("serve", "-m", trained.results, "--host", "0.0.0.0"), trained.env, check=False, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--token" in lines[0] and "0.0.0.0" in lines[0], result.stderr


def test_saliency_flag_and_missing_extra(trained):
    from multitask_nnunet.serve.options import saliency_available
    if not saliency_available():   # until the saliency feature is merged: one line, before loading anything
        result = run(ours("serve", "-m", trained.results, "--saliency"), trained.env, check=False, timeout=120)
        assert result.returncode == 1 and result.stderr.strip().splitlines() == [
            "multitask-nnunet serve: error: --saliency: not available in this version of multitask-nnunet"]
    # without the serve extra (its packages made unimportable): the other commands work, serve says in one line
    # what to install
    without = ("import sys\nfor m in ('fastapi', 'uvicorn', 'python_multipart', 'starlette'): sys.modules[m] = None\n"
               "from multitask_nnunet.cli import main\n")
    result = run([sys.executable, "-c", without + "main(['--help'])"], trained.env, check=False, timeout=120)
    assert result.returncode == 0 and "serve" in result.stdout and "predict" in result.stdout, result.stderr
    code = without + f"sys.exit(main(['serve', '-m', {str(trained.results)!r}]))"
    result = run([sys.executable, "-c", code], trained.env, check=False, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'multitask-nnunet serve: error: serve needs the serve extra (fastapi is missing): '
        'pip install "multitask-nnunet[serve]"'], result.stderr


def test_channels_from_upload_names(tmp_path):
    """Several channels: nnU-Net's suffixes give the order, whatever order the files come in."""
    from multitask_nnunet.serve.uploads import ServiceError, Upload, assign_channels
    channels = {"0": "T1", "1": "T2"}

    def upload(name):
        path = tmp_path / f"upload_{len(list(tmp_path.iterdir()))}"
        sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkFloat32), str(path) + ".nii")
        os.rename(str(path) + ".nii", path)
        return Upload(name, str(path))

    name, ordered = assign_channels([upload("mr_7_0001.nii.gz"), upload("mr_7_0000.nii")], channels)
    assert name == "mr_7" and [(u.name, e) for u, e in ordered] == [("mr_7_0000.nii", ".nii"),
                                                                     ("mr_7_0001.nii.gz", ".nii.gz")]
    for names, status, words in ((["mr_7_0000.nii", "mr_8_0001.nii"], 422, "one case"),
                                 (["mr_7_0000.nii", "mr_7_0002.nii"], 422, "missing 0001"),
                                 (["mr_7_0000.nii", "mr_7.nii"], 400, "mr_7.nii: not named"),
                                 (["mr_7_0000.nii"], 422, "expects 2 channel(s): 0000=T1, 0001=T2")):
        with pytest.raises(ServiceError) as e:
            assign_channels([upload(n) for n in names], channels)
        assert e.value.status == status and words in e.value.message, e.value.message


def test_results_expire_by_age_and_count(tmp_path):
    from multitask_nnunet.serve.service import ResultStore, Stored
    store = ResultStore(ttl=0.5, max_count=2)
    for i in range(3):
        (tmp_path / f"{i}.nii.gz").write_bytes(b"mask")
        store.add(str(i), Stored(time.monotonic(), {}, str(tmp_path / f"{i}.nii.gz"), None, None))
    assert store.get("0") is None and not (tmp_path / "0.nii.gz").exists()   # the oldest went, with its file
    assert store.get("1") and store.get("2") and len(store) == 2
    time.sleep(0.6)
    assert store.get("2") is None and len(store) == 0 and not list(tmp_path.iterdir())


def test_viewer_turns_images_to_the_patients_axes():
    from multitask_nnunet.serve.viewer import Views
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)   # (z, y, x)
    # stored right-to-left and anterior-to-posterior flipped (RAS-like: direction diag(-1, -1, 1))
    views = Views.from_case(volume, (volume > 5).astype(np.uint8), None, (3.0, 2.0, 1.0),
                            (-1, 0, 0, 0, -1, 0, 0, 0, 1), "MR")
    low, high = views.window
    expected = np.clip((volume - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)[:, ::-1, ::-1]
    np.testing.assert_array_equal(views.image, expected)
    assert views.spacing == (3.0, 2.0, 1.0) and views.sizes() == {"axial": 2, "coronal": 3, "sagittal": 4}
    # an axial acquisition stored with its axes swapped (x index along the patient's y): transposed back
    swapped = Views.from_case(volume, volume.astype(np.uint8), None, (3.0, 2.0, 1.0),
                              (0, 1, 0, 1, 0, 0, 0, 0, 1), "CT")
    assert swapped.image.shape == (2, 4, 3) and swapped.spacing == (3.0, 1.0, 2.0)
    np.testing.assert_array_equal(swapped.mask, volume.astype(np.uint8).transpose(0, 2, 1))
    import io
    from PIL import Image
    # square pixels, as large as the plane's finer spacing: axial 3 x 4 voxels of 2 x 1 mm -> 6 x 4 pixels
    for view, size in (("axial", (6, 4)), ("coronal", (3, 3)), ("sagittal", (4, 6))):
        png = Image.open(io.BytesIO(swapped.png(view, 0, "mask")))
        assert png.mode == "RGBA" and png.size == size, (view, png.size)


# ---------------------------------------------------------------- a good case
def test_good_case_matches_predict(server, case, cli_prediction):
    cli_mask, cli_probabilities, cli_class = cli_prediction
    response = server.predict(case)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["name"] == case.name[:-len("_0000.nii.gz")]
    assert result["class_index"] == cli_class and result["class_name"] == list(cli_probabilities)[cli_class]
    assert list(result["probabilities"]) == list(cli_probabilities)
    np.testing.assert_allclose(list(result["probabilities"].values()), list(cli_probabilities.values()), atol=1e-5)
    assert set(result["uncertainty"]) >= {"entropy", "confidence"}
    assert result["uncertainty"]["confidence"] == pytest.approx(max(result["probabilities"].values()), abs=1e-5)
    # final validation fitted fold 0's temperature (calibration.json); the service applies it, as predict does
    model = server.get("/model").json()
    assert result["calibrated"] is True and set(model["calibration"]) == {"0"} and model["calibration"]["0"] > 0
    assert set(result["timings"]) >= {"read", "preprocess", "network", "export", "queue", "service"}
    saliency = server.get("/model").json()["saliency"]   # served with --saliency where the feature exists
    assert result["saliency"] is saliency

    mask_response = server.get(f"/predict/{result['id']}/mask")
    assert mask_response.status_code == 200
    assert mask_response.headers["content-disposition"].endswith(f'{result["name"]}.nii.gz"')
    mask_file = server.tmp.parent / "served_mask.nii.gz"
    mask_file.write_bytes(mask_response.content)
    mask, image = sitk.ReadImage(str(mask_file)), sitk.ReadImage(str(case))
    assert mask.GetSize() == image.GetSize()
    for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        np.testing.assert_allclose(get(mask), get(image), rtol=0, atol=1e-6)
    labels = sitk.GetArrayFromImage(mask)
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(cli_mask))
    assert labels.any()
    # volumes: regions of dataset.json (foreground = labels 1 and 2, label_2 = 2), in mL
    voxel_ml = np.prod(image.GetSpacing()) / 1000
    assert result["volumes_ml"] == pytest.approx({"foreground": (labels > 0).sum() * voxel_ml,
                                                  "label_2": (labels == 2).sum() * voxel_ml}, abs=1e-3)

    # the viewer's slices; the saliency map where it exists
    sizes = result["viewer"]["sizes"]
    assert sizes == {"axial": image.GetSize()[2], "coronal": image.GetSize()[1], "sagittal": image.GetSize()[0]}
    for view, n in sizes.items():
        for layer in ("image", "mask") + (("saliency",) if saliency else ()):
            png = server.get(f"/predict/{result['id']}/slice/{view}/{n // 2}?layer={layer}")
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(server.get(f"/predict/{result['id']}/slice/axial/{sizes['axial']}"), 404, "slice")
    if saliency:
        saliency_file = server.tmp.parent / "served_saliency.nii.gz"
        saliency_file.write_bytes(server.get(f"/predict/{result['id']}/saliency").content)
        saliency_map = sitk.ReadImage(str(saliency_file))
        assert saliency_map.GetSize() == image.GetSize()
        np.testing.assert_allclose(saliency_map.GetOrigin(), image.GetOrigin(), atol=1e-6)
    else:
        assert_one_line_error(server.get(f"/predict/{result['id']}/saliency"), 404, "saliency")
    assert_one_line_error(server.get(f"/predict/{'0' * 32}/mask"), 404, "no result")
    assert wait_until(lambda: not any((server.private() / "uploads").iterdir()))


def test_file_names_never_reach_the_file_system(server, case, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    names = ["../../../../escaped_0000.nii.gz", "..\\..\\escaped_win_0000.nii.gz"]
    for name in names:
        response = server.predict(case, names=[name])
        assert response.status_code == 200, response.text
        assert response.json()["files"] == [name.replace("\\", "/").split("/")[-1]]
    assert not list(base.rglob("escaped*")) and not list(Path("/tmp").glob("escaped*"))
    assert not list(server.private().rglob("escaped*"))


# ---------------------------------------------------------------- bad input
def _nifti(path: Path, array: np.ndarray, spacing=None) -> Path:
    image = sitk.GetImageFromArray(array)
    if spacing:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def _bad_inputs(case: Path, folder: Path):
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(case))).astype(np.float32)
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake_0000.nii.gz").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "truncated_0000.nii.gz").write_bytes(case.read_bytes()[:case.stat().st_size // 2])
    nan = image.copy()
    nan[2, 3, 4] = np.nan
    return [  # (id, files, names, status, words in the message)
        ("not a NIfTI name", [folder / "notes.txt"], None, 415, ["notes.txt", "NIfTI"]),
        ("not a NIfTI", [folder / "fake_0000.nii.gz"], None, 415, ["fake_0000.nii.gz", "not a NIfTI"]),
        ("corrupt", [folder / "truncated_0000.nii.gz"], None, 422, ["truncated_0000.nii.gz", "truncated"]),
        ("NaN", [_nifti(folder / "nan_0000.nii.gz", nan)], None, 422, ["nan_0000.nii.gz", "NaN"]),
        ("2d", [_nifti(folder / "flat_0000.nii.gz", image[image.shape[0] // 2], (0.75, 0.75))], None, 422,
         ["2d", "3d"]),
        ("two channels", [case, case], [case.name, case.name.replace("_0000", "_0001")], 422,
         ["2 file(s)", "expects 1 channel"]),
        ("empty file", [folder / "empty_0000.nii.gz"], None, 400, ["empty"]),
    ]


def test_bad_input(server, case, tmp_path):
    (tmp_path / "empty_0000.nii.gz").write_bytes(b"")
    for what, files, names, status, words in _bad_inputs(case, tmp_path):
        detail = assert_one_line_error(server.predict(*files, names=names), status, *words)
        assert str(server.tmp) not in detail, f"{what}: the message shows the server's paths: {detail}"
    # an empty body, a body that is not multipart
    assert_one_line_error(requests.post(f"{server.url}/predict", headers=AUTH, timeout=30), 400, "empty")
    assert_one_line_error(requests.post(f"{server.url}/predict", headers={**AUTH, "Content-Type":
                          "multipart/form-data; boundary=xyz"}, timeout=30), 400, "empty")
    assert_one_line_error(requests.post(f"{server.url}/predict", data=case.read_bytes(), headers={
        **AUTH, "Content-Type": "application/octet-stream"}, timeout=30), 415, "multipart")
    # over the size limit: announced (Content-Length) and streamed (chunked, no length): 413 either way
    big = np.random.default_rng(1).bytes(LIMIT_MB * 2 ** 20 + 1000)
    assert_one_line_error(requests.post(f"{server.url}/predict", files={"files": ("big_0000.nii.gz", big)},
                                        headers=AUTH, timeout=60), 413, "limit")
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big_0000.nii.gz\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()

    def chunks():
        yield head
        for i in range(0, len(big), 2 ** 16):
            yield big[i:i + 2 ** 16]
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        response = requests.post(f"{server.url}/predict", data=chunks(), timeout=60,
                                 headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert_one_line_error(response, 413, "limit")
    except requests.ConnectionError:  # the server may close before the client has sent it all; it must live on
        pass
    # temporary files went with each request; the service keeps serving
    assert wait_until(lambda: not any((server.private() / "uploads").iterdir())), \
        list((server.private() / "uploads").rglob("*"))
    assert server.process.poll() is None
    assert server.predict(case).status_code == 200


# ---------------------------------------------------------------- the queue, the timeout, shutting down
def test_full_queue_answers_503(server, case):
    n = 8   # --queue-size 1: one case predicted, one waiting, the rest turned away
    barrier = threading.Barrier(n)
    responses = [None] * n

    def client(i):
        barrier.wait()
        responses[i] = server.predict(case)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 1, statuses
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1
            assert_one_line_error(r, 503, "queue")
        else:
            assert r.json()["class_name"]
    assert server.predict(case).status_code == 200   # still serving


def test_env_token_timeout_and_cleanup_on_shutdown(trained, case, tmp_path):
    # what a killed server left (its process is gone): removed at start; the token from the environment
    from multitask_nnunet.io.atomic import owner_tag
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftover = tmp_path / "tmp" / f"multitask-nnunet-serve-{owner_tag().rsplit('-', 1)[0]}-{gone.pid}-x1_y"
    (leftover / "uploads" / "tmpabc").mkdir(parents=True)
    server = start_server(trained, tmp_path, "--timeout", "0.05", env={"MULTITASK_NNUNET_TOKEN": "from-env"})
    assert not leftover.exists() and "removed" in server.log.read_text()
    try:
        private = server.private()
        assert_one_line_error(server.predict(case, headers={}), 401, "token")
        assert_one_line_error(server.predict(case, headers={"Authorization": "Bearer from-env"}), 504, "--timeout")
        assert wait_until(lambda: not any((private / "uploads").iterdir()))   # the worker is done with it
        assert server.get("/health", headers={}).json()["results"] == 0   # and dropped its late result
        assert not list((private / "results").iterdir())
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]   # SIGTERM: a graceful stop
    assert not private.exists(), list(private.rglob("*"))


# ---------------------------------------------------------------- the page, in a real browser
def test_viewer_in_headless_chromium(server, case, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
    if not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)):
        pytest.skip(f"no browser: {CHROMIUM} or {CHROMEDRIVER} missing (Debian: apt-get install chromium "
                    f"chromium-driver; .ci/run does)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                     "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(f"{server.url}/?token={TOKEN}")
        WebDriverWait(driver, 30).until(lambda d: "classes:" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "files").send_keys(str(case))
        driver.find_element(By.ID, "predict").click()
        WebDriverWait(driver, 120).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#probabilities .bar-row") or
            "error" in d.find_element(By.ID, "status").get_attribute("class"))
        assert "done" in driver.find_element(By.ID, "status").text, driver.find_element(By.ID, "status").text
        expected = server.predict(case).json()
        rows = driver.find_elements(By.CSS_SELECTOR, "#probabilities .bar-row")
        shown = {r.get_attribute("data-class"): float(r.get_attribute("data-probability")) for r in rows}
        assert shown == pytest.approx(expected["probabilities"], abs=1e-6)
        assert driver.find_element(By.ID, "class").text == expected["class_name"]
        top = driver.find_element(By.CSS_SELECTOR, "#probabilities .bar-row.top .bar")
        assert top.size["width"] > 0
        loaded = ("const i = document.querySelector(arguments[0]); "
                  "return i.complete && i.naturalWidth > 0 && getComputedStyle(i).display !== 'none';")
        for view in ("axial", "coronal", "sagittal"):
            for layer in ("image", "mask"):
                WebDriverWait(driver, 30).until(lambda d: d.execute_script(loaded, f"#view-{view} img.{layer}"))
        # the slider moves the slice; the overlay toggles
        slider = driver.find_element(By.CSS_SELECTOR, "#view-axial input[type=range]")
        before = driver.find_element(By.CSS_SELECTOR, "#view-axial img.image").get_attribute("src")
        driver.execute_script("arguments[0].value = 0; arguments[0].dispatchEvent(new Event('input'));", slider)
        assert driver.find_element(By.CSS_SELECTOR, "#view-axial img.image").get_attribute("src") != before
        driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));",
                              slider, expected["viewer"]["sizes"]["axial"] // 2)
        link = driver.find_element(By.ID, "mask-link").get_attribute("href")
        assert requests.get(link, timeout=30).status_code == 200   # the download link carries the token
        driver.save_screenshot(str(tmp_path / "viewer.png"))
        driver.find_element(By.ID, "show-mask").click()
        assert not driver.find_element(By.CSS_SELECTOR, "#view-axial img.mask").is_displayed()
        # the saliency toggle is there only where the model was served with saliency
        assert bool(driver.find_element(By.ID, "show-saliency").get_attribute("disabled")) != expected["saliency"]
    finally:
        driver.quit()
    assert (tmp_path / "viewer.png").stat().st_size > 10000
