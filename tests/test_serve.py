"""``minitrain serve``: a real server (uvicorn, in its own process, on a free port of 127.0.0.1)
serving a tiny exported ONNX model. Concurrent clients get what ``minitrain predict`` says, in
batches; bad input is one JSON line with a 4xx, and the server goes on; /metrics is Prometheus
text; SIGTERM lets requests in flight finish; the page at / works in headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from minitrain.commands.cli import main
from minitrain.commands.export import export
from minitrain.commands.predict import predict
from minitrain.commands.start import RunRequest, prepare
from minitrain.kit.data import load_cifar10
from minitrain.testing import make_fake_cifar10

pytest.importorskip("onnxruntime", reason="the serve extra is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

FIRST_PARTY_PLUGINS = {"checkpoint"}
KEY = "s3cret-key"
BROWSER = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
)
TINY = '''
"""Ten-class images through a tiny network."""
from pathlib import Path

import torch
from torch import nn

import minitrain
from minitrain.kit.data import CIFAR10_CLASSES, cifar10_loaders


class Config(minitrain.RecipeConfig):
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.2
    device: str = "cpu"
    data_dir: Path = Path({data_dir!r})


def build_model(config):
    return nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(192, 10))


def build(config, device):
    train, test = cifar10_loaders(config.data_dir, config.batch_size, device=device, seed=config.seed)
    model = build_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    return minitrain.Components(model=model, optimizer=optimizer, train_loader=train, val_loader=test,
                                class_names=CIFAR10_CLASSES)
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny trained model as an ONNX file, and 20 of its test images as PNG files."""
    root = tmp_path_factory.mktemp("serve")
    data = make_fake_cifar10(root / "data", train_per_batch=16, test_size=20)
    recipe = root / "recipe.py"
    recipe.write_text(TINY.format(data_dir=str(data)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(RunRequest(recipe, ["epochs=2"], ["checkpoint"], ["console"], root / "run")).fit()
        model = export(root / "run", "onnx")
    pictures, _ = load_cifar10(data, train=False)
    paths = []
    for i, picture in enumerate(pictures):
        paths.append(root / f"test{i}.png")
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(paths[-1])
    return model, paths


class Server:
    """``minitrain serve ARGS`` in a child process, on a port the system picked."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        command = [sys.executable, "-m", "minitrain", "serve", *args, "--port", "0"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        self.url = ""
        deadline = time.monotonic() + 240  # a loaded CI machine takes a while to import torch
        assert self.process.stdout is not None
        while not self.url and select.select([self.process.stdout], [], [], max(0, deadline - time.monotonic()))[0]:
            line = self.process.stdout.readline()
            if not line:
                break
            found = re.search(r" at http://[^:]+:(\d+)/", line)
            self.url = f"http://127.0.0.1:{found.group(1)}" if found else ""
        assert self.url, f"the server did not start: {log.read_text()}"
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # (drain)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    model, _ = exported
    log = tmp_path_factory.mktemp("log") / "server.log"
    running = Server([str(model), "--max-batch", "16", "--batch-timeout", "20", "--api-key", KEY], log)
    yield running
    assert running.stop() == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def call(url: str, body: bytes | None = None, headers: dict | None = None, key: str | None = KEY):
    """``(status, headers, body)`` of one HTTP request (POST when there is a body)."""
    headers = dict(headers or {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    )
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def metrics(server: Server) -> dict[str, dict]:
    """Every sample of /metrics, read with Prometheus's own parser: {family: {sample name+labels: value}}."""
    status, _, body = call(f"{server.url}/metrics")
    assert status == 200
    return {
        family.name: {s.name + json.dumps(s.labels, sort_keys=True): s.value for s in family.samples}
        for family in text_string_to_metric_families(body.decode())
    }


def test_concurrent_requests_are_batched_and_answer_like_predict(server, exported):
    model, paths = exported
    expected = {str(path): result["top"] for path, result in zip(paths, predict(model, paths, top_k=5))}
    before = metrics(server)["minitrain_batch_size"]

    def ask(i: int) -> tuple[Path, int, dict]:
        path = paths[i % len(paths)]
        status, _, body = call(f"{server.url}/predict", path.read_bytes(), {"Content-Type": "image/png"})
        return path, status, json.loads(body)

    with ThreadPoolExecutor(16) as clients:
        answers = list(clients.map(ask, range(200)))
    for path, status, answer in answers:
        assert status == 200, answer
        (prediction,) = answer["predictions"]
        top, want = prediction["top"], expected[str(path)]
        assert [t["class"] for t in top] == [t["class"] for t in want]
        assert [t["probability"] for t in top] == pytest.approx([t["probability"] for t in want], abs=1e-6)

    after = metrics(server)["minitrain_batch_size"]
    count = after["minitrain_batch_size_count{}"] - before["minitrain_batch_size_count{}"]
    images = after["minitrain_batch_size_sum{}"] - before["minitrain_batch_size_sum{}"]
    assert images == 200 and images / count > 1, f"{images} images in {count} batches"

    body, headers = multipart([(p.name, p.read_bytes()) for p in paths[:3]])  # several images in one request
    status, _, answer = call(f"{server.url}/predict?top_k=2", body, headers)
    assert status == 200
    several = json.loads(answer)["predictions"]
    assert [p["image"] for p in several] == [p.name for p in paths[:3]]
    for prediction, path in zip(several, paths[:3]):
        assert [t["class"] for t in prediction["top"]] == [t["class"] for t in expected[str(path)][:2]]


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` pixels, with almost no data: Pillow must
    refuse it from its header, before decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_bad_input_is_a_4xx_json_line_and_the_server_goes_on(server, exported):
    _, paths = exported
    png = paths[0].read_bytes()
    too_many, headers = multipart([("x.png", png)] * 33)
    predict_url = f"{server.url}/predict"
    cases = [
        ("not an image", (predict_url, b"hello, world", {"Content-Type": "image/png"}), 422, "cannot read image"),
        ("empty body", (predict_url, b"", {"Content-Type": "image/png"}), 400, "empty body"),
        ("truncated", (predict_url, png[: len(png) // 2], {"Content-Type": "image/png"}), 422, "truncated"),
        ("bomb", (predict_url, bomb_png(20000, 20000), {"Content-Type": "image/png"}), 413, "too large to decode"),
        ("too many", (predict_url, too_many, headers), 413, "too many images"),
        ("content type", (predict_url, png, {"Content-Type": "application/json"}), 415, "unsupported content type"),
        ("no content type", (predict_url, png, {"Content-Type": ""}), 415, "unsupported content type"),
        ("bad top_k", (f"{predict_url}?top_k=0", png, {"Content-Type": "image/png"}), 422, "top_k"),
        ("unknown path", (f"{server.url}/nowhere", None, None), 404, "Not Found"),
    ]
    for name, args, status, message in cases:
        got, _, body = call(*args)
        assert got == status, (name, body)
        assert body.count(b"\n") == 0 and b"Traceback" not in body, (name, body)
        assert message in json.loads(body)["error"], (name, body)
    for key, status in [(None, 401), ("wrong", 403)]:
        got, headers, body = call(predict_url, png, {"Content-Type": "image/png"}, key=key)
        assert got == status and "API key" in json.loads(body)["error"]
        got, _, _ = call(f"{server.url}/metadata", key=key)
        assert got == status
    assert call(f"{server.url}/health", key=None)[0] == 200  # open: for load balancers
    status, _, body = call(predict_url, png, {"Content-Type": "image/png"})
    assert status == 200 and json.loads(body)["predictions"][0]["image"] == "body"  # still serving
    assert server.process.poll() is None


def test_metadata_and_prometheus_metrics(server, exported):
    status, _, body = call(f"{server.url}/metadata")
    metadata = json.loads(body)
    assert status == 200 and metadata["class_names"][0] == "airplane" and metadata["input_size"] == [32, 32]
    assert metadata["pixel_scale"] == 255 and metadata["runtime"] == "onnxruntime" and "checkpoint" not in metadata
    assert metadata["server"]["max_batch"] == 16
    call(f"{server.url}/predict", b"", {"Content-Type": "image/png"})  # one error at least
    seen = metrics(server)
    assert seen["minitrain_requests"]['minitrain_requests_total{"path": "/metadata", "status": "200"}'] >= 1
    assert seen["minitrain_errors"]['minitrain_errors_total{"path": "/predict", "status": "400"}'] >= 1
    assert seen["minitrain_request_seconds"]["minitrain_request_seconds_count{}"] >= 1
    assert {"minitrain_batch_size", "minitrain_model_seconds", "minitrain_queue_seconds"} <= seen.keys()


def test_sigterm_lets_requests_in_flight_finish(exported, tmp_path):
    model, paths = exported
    # a long batch timeout holds the requests in the queue: they are in flight when SIGTERM comes
    server = Server([str(model), "--batch-timeout", "1500", "--host", "0.0.0.0", "--api-key", KEY], tmp_path / "log")
    try:
        with ThreadPoolExecutor(3) as clients:
            pending = [
                clients.submit(call, f"{server.url}/predict", p.read_bytes(), {"Content-Type": "image/png"})
                for p in paths[:3]
            ]
            deadline = time.monotonic() + 120
            while metrics(server)["minitrain_predict_in_flight"]["minitrain_predict_in_flight{}"] < 3:
                assert time.monotonic() < deadline, "the requests never reached the server"
                time.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            statuses = [future.result()[0] for future in pending]
        assert statuses == [200, 200, 200]  # all three were queued, waiting for their batch: in flight
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()
    log = (tmp_path / "log").read_text()
    assert "reachable from the network" in log and "Traceback" not in log


def test_bad_command_lines_are_one_line(exported, tmp_path, capsys):
    model, _ = exported
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cases = [
        (["serve", str(tmp_path / "missing.onnx")], "not found:"),
        (["serve", str(model), "--port", str(port)], f"port {port} on 127.0.0.1 is in use"),
        (["serve", str(model), "--max-batch", "0"], "--max-batch must be at least 1"),
        (["serve", str(model), "--host", "no.such.host.invalid"], "--host no.such.host.invalid"),
    ]
    with taken:
        for argv, message in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1, (argv, err)


# --- the page, in a real browser ------------------------------------------------------------------


class Browser:
    """Headless Chromium driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``:
    JSON messages separated by NUL bytes on file descriptors 3 and 4), so no client library is needed."""

    def __init__(self, profile: Path):
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()

        def descriptors():  # in the child: the protocol's fixed descriptors
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
        self.process = subprocess.Popen(
            [BROWSER, *flags, "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=descriptors,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next, self.events = b"", 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Runtime.enable", session=True)

    def send(self, method: str, session: bool = False, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 16)
                assert chunk, "chromium closed the pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next:
                assert "error" not in answer, answer
                return answer["result"]
            self.events.append(answer)

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)["result"].get(
            "value"
        )

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send("Browser.close")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=20)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.mark.skipif(
    BROWSER is None, reason="headless Chromium not installed (Debian: apt-get install chromium; .ci/run installs it)"
)
def test_the_page_classifies_a_picked_image_in_chromium(server, exported, tmp_path):
    model, paths = exported
    (want,) = predict(model, paths[:1], top_k=5)
    browser = Browser(tmp_path / "profile")
    try:
        browser.send("Page.navigate", session=True, url=f"{server.url}/")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
        assert browser.evaluate("document.getElementById('keyrow').hidden") is False  # the server wants a key
        browser.evaluate(f"document.getElementById('key').value = {json.dumps(KEY)}")
        document = browser.send("DOM.getDocument", session=True)["root"]["nodeId"]
        node = browser.send("DOM.querySelector", session=True, nodeId=document, selector="#file")["nodeId"]
        browser.send("DOM.setFileInputFiles", session=True, nodeId=node, files=[str(paths[0])])  # as a person picks it
        rows = browser.wait_for(
            "document.querySelectorAll('#bars .bar').length === 5 && Array.from(document.querySelectorAll("
            "'#bars .bar')).map(function (r) { return [r.querySelector('.name').textContent, "
            "r.querySelector('.p').textContent]; })"
        )
        assert [name for name, _ in rows] == [t["class"] for t in want["top"]]
        assert rows[0][1] == f"{100 * want['top'][0]['probability']:.1f}%"
        assert browser.evaluate("document.getElementById('status').textContent") == f"{paths[0].name}: {rows[0][0]}"
        shot = browser.send("Page.captureScreenshot", session=True)["data"]
        assert Image.open(io.BytesIO(base64.b64decode(shot))).size[0] > 0
        errors = [
            e for e in browser.events if e.get("method") in ("Runtime.exceptionThrown",) or
            (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        ]  # fmt: skip
        assert errors == []
    finally:
        browser.close()
