"""`cvt serve`: one service (the real command, on a private Ray instance, a tiny model, one
replica) answers as `cvt.pipeline` does, in each of the Inference API's shapes and to
huggingface_hub's `InferenceClient`, refuses hostile requests with their 4xx and goes on
answering, bounds what idle, slow and greedy clients hold, says 503 when full, draws the
attention rollout, shows its page in a real browser (Debian's chromium), and stops on SIGTERM
within 5 s, start-up included, leaving no process behind. Everything runs on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import io
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from skimage import data as skimage_data

import cvt
from cvt.cli import main
from conftest import RAY_TESTS, save_tiny_classifier

# one worker runs this module (so its service starts once) and every other test that starts Ray
pytestmark = [pytest.mark.subprocess, RAY_TESTS]

MAX_BODY_MB = 1  # a low limit, so that the oversized bodies below are quick to send
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 5
# the service's time limits, low so that the tests see them act (the defaults are 10 s, 30 s, 75 s)
HEADER_TIMEOUT_S, BODY_TIMEOUT_S, KEEP_ALIVE_S = 10, 10, 3
MAX_CLIENT_REQUESTS = 64  # over a replica's capacity, so that one address can fill it
CAPACITY = 32  # the images a replica admits at once: 2 x --max-batch-size (8) + 4, at least 32
ANSWER_TIMEOUT_S = 5  # a request's time to answer while clients hold connections (the house's floor)
CPUS_PER_REPLICA = 2  # the machines the suite runs on have two CPUs at least
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    found = {}
    for name in ("chelsea", "coffee", "astronaut"):
        found[name] = folder / f"{name}.jpg"
        found[name].write_bytes(jpeg(getattr(skimage_data, name)()))
    return found


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def reference(model_dir):
    """The pipeline the service must agree with (its engine built here, and cached for the service)."""
    return cvt.pipeline("image-classification", str(model_dir))


@pytest.fixture(scope="module")
def service(model_dir, reference, tmp_path_factory):
    """`cvt serve` in its own process group: (its base URL, the process, its stderr file)."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "stderr.txt"
    with open(log, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "cvt", "serve", str(model_dir), "--port", str(port),
                                    "--max-body-mb", str(MAX_BODY_MB), "--batch-wait-ms", "20",
                                    "--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s",
                                    str(BODY_TIMEOUT_S), "--keep-alive-s", str(KEEP_ALIVE_S),
                                    "--max-client-requests", str(MAX_CLIENT_REQUESTS), "--cpus-per-replica",
                                    str(CPUS_PER_REPLICA)],
                                   stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log)
        yield url, process, log
    finally:
        stop(process)


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"cvt serve exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:  # refused, or the proxy's 503 before the replica is up
            time.sleep(0.5)
    pytest.fail(f"cvt serve did not become healthy in {START_TIMEOUT_S} s: {log.read_text()[-3000:]}")


def request(url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    """(status, body) of one request; urllib's default Content-Type for a body is form-urlencoded."""
    return request_with_headers(url, body, headers, timeout)[:2]


def request_with_headers(url: str, body: bytes | None = None, headers: dict | None = None,
                         timeout: float = 60) -> tuple[int, bytes, dict]:
    """(status, body, the answer's headers, their names in lower case) of one request."""
    if body is not None and len(body) > MAX_BODY_MB * 1_000_000:
        return *request_expecting_100_continue(url, len(body)), {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers or {}), timeout=timeout) as answer:
            return answer.status, answer.read(), {k.lower(): v for k, v in answer.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, err.read(), {k.lower(): v for k, v in err.headers.items()}


def request_expecting_100_continue(url: str, length: int) -> tuple[int, bytes]:
    """POST a large body as curl does (`Expect: 100-continue`): the body would follow a
    "100 Continue". The service must refuse by Content-Length at once (sent blindly, the body
    races the answer and the closing connection: a broken pipe on the client). A service that
    asked for the body instead would leave `begin` (which skips a 100) waiting: a timeout."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as connection:
        connection.sendall(f"POST {parts.path}?{parts.query} HTTP/1.1\r\nHost: localhost\r\n"
                           f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n".encode())
        answer = http.client.HTTPResponse(connection)
        answer.begin()
        return answer.status, answer.read()


def multipart(field: str, filename: str, content: bytes) -> tuple[bytes, dict]:
    boundary = "cvt-test-boundary-7d3f"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def assert_as_pipeline(answer: bytes, expected: list[dict], top_k: int = 5) -> None:
    got = json.loads(answer)
    assert [p["label"] for p in got] == [p["label"] for p in expected[:top_k]]
    # scores are probabilities (1 is their scale): the 1e-5 at fp32, absolute
    assert np.allclose([p["score"] for p in got], [p["score"] for p in expected[:top_k]], rtol=0, atol=1e-5)


def test_predict_answers_as_the_pipeline(service, reference, photos):
    url = service[0]
    for name, path in photos.items():
        expected = reference(str(path))
        content = path.read_bytes()
        status, answer = request(f"{url}/predict", content)  # form-urlencoded, as urllib and curl send
        assert status == 200, answer
        assert_as_pipeline(answer, expected)
        status, answer = request(f"{url}/predict?top_k=2", content, {"Content-Type": "image/jpeg"})
        assert status == 200 and len(json.loads(answer)) == 2
        assert_as_pipeline(answer, expected, top_k=2)
        status, answer = request(f"{url}/predict?top_k=1000", *multipart("file", path.name, content))
        assert status == 200, answer
        assert_as_pipeline(answer, expected, top_k=len(reference.labels))  # top_k over the labels: all of them


def wide_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1, 2_000_000), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    whole = jpeg(skimage_data.chelsea())
    return whole[: len(whole) // 3]


JSON = {"Content-Type": "application/json"}
HOSTILE = {  # name: (path and query, body, headers, status, words of the message)
    "empty body": ("/predict", b"", {}, 400, "empty"),
    "text file": ("/predict", b"not an image, just text\n" * 10, {"Content-Type": "text/plain"}, 400,
                  "not an image"),
    "truncated JPEG": ("/predict", truncated_jpeg(), {"Content-Type": "image/jpeg"}, 400, "truncated"),
    "1x2,000,000 PNG": ("/predict", wide_png(), {"Content-Type": "image/png"}, 400, "budget"),
    "body over the limit": ("/predict", os.urandom(MAX_BODY_MB * 1_000_000 + 1), {}, 413, "limit"),
    "top_k=0": ("/predict?top_k=0", jpeg(skimage_data.coffee()), {}, 400, "top_k"),
    "top_k=many": ("/predict?top_k=many", jpeg(skimage_data.coffee()), {}, 400, "top_k"),
    "form without a file": ("/predict", b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
                            {"Content-Type": "multipart/form-data; boundary=b"}, 400, "no file"),
    "attention of a text file": ("/attention", b"hello", {}, 400, "not an image"),
    "JSON inputs not base64": ("/predict", b'{"inputs": "not base64!"}', JSON, 400, "base64"),
    "JSON inputs a URL": ("/predict", b'{"inputs": "http://127.0.0.1:1/cat.jpg"}', JSON, 400, "not fetched"),
    "JSON of a text file": ("/predict", json.dumps({"inputs": base64.b64encode(b"hello").decode()}).encode(),
                            JSON, 400, "not an image"),
    "JSON unknown parameter": ("/predict", b'{"inputs": "aGVsbG8=", "parameters": {"top_p": 1}}', JSON, 400,
                               "top_p"),
    "JSON top_k=0": ("/predict", json.dumps({"inputs": base64.b64encode(jpeg(skimage_data.coffee())).decode(),
                                             "parameters": {"top_k": 0}}).encode(), JSON, 400, "top_k"),
    "JSON sigmoid": ("/predict", b'{"inputs": "aGVsbG8=", "parameters": {"function_to_apply": "sigmoid"}}', JSON,
                     400, "softmax"),
    "JSON not an object": ("/predict", b"[1, 2]", JSON, 400, "inputs"),
    "JSON unreadable": ("/predict", b"\xff\xd8 a JPEG sent as JSON", JSON, 400, "JSON"),
    "150 header lines": ("/health", None, {f"X-Filler-{i}": "1" for i in range(150)}, 431, "header lines"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_request_gets_its_4xx_and_the_next_is_answered(service, reference, photos, case):
    url = service[0]
    where, body, headers, expected_status, words = HOSTILE[case]
    status, answer = request(url + where, body, headers)
    assert status == expected_status, answer
    assert words in json.loads(answer)["error"]
    status, answer = request(f"{url}/predict", photos["chelsea"].read_bytes())
    assert status == 200
    assert_as_pipeline(answer, reference(str(photos["chelsea"])))


def send_zeros_slowly(url: str, total: int = 50_000_000, chunk: int = 64 * 1024,
                      time_limit_s: float = 60) -> tuple[int, bytes, int]:
    """POST `total` zero bytes, chunked (no Content-Length to refuse early), a chunk every
    millisecond, until the service answers: (its status, its body, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    sent, deadline = 0, time.monotonic() + time_limit_s
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                           b"Content-Type: application/octet-stream\r\n\r\n")
        piece = b"%x\r\n" % chunk + bytes(chunk) + b"\r\n"
        try:
            while sent < total and time.monotonic() < deadline:
                if select.select([connection], [], [], 0)[0]:
                    break  # the answer came before the body ended
                connection.sendall(piece)
                sent += chunk
                time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the service closed the connection after answering
        answer = http.client.HTTPResponse(connection)  # its head and body may come in two packets
        answer.begin()
        return answer.status, answer.read(), sent


def test_50_mb_of_zeros_sent_slowly_is_refused_early(service, reference, photos):
    url = service[0]
    status, answer, sent = send_zeros_slowly(url)
    assert status == 413, answer[:200]
    assert "limit" in json.loads(answer)["error"]
    assert sent < 50_000_000  # refused while it was still coming
    status, answer = request(f"{url}/predict", photos["coffee"].read_bytes())
    assert status == 200
    assert_as_pipeline(answer, reference(str(photos["coffee"])))


def test_the_inference_client_gets_what_the_pipeline_gives(service, reference, photos):
    """huggingface_hub's client posts to the URL it is given: the raw bytes without parameters,
    the JSON {"inputs": base64, "parameters": {"top_k": 3}} with them. Given the service's
    address alone (as for an Inference Endpoint), it posts to "/"."""
    from huggingface_hub import InferenceClient

    url = service[0]
    for client in (InferenceClient(model=f"{url}/predict"), InferenceClient(base_url=url)):
        for name, path in photos.items():
            expected = reference(str(path))
            for top_k in (3, None):  # JSON, then the raw bytes
                got = client.image_classification(path, top_k=top_k)
                assert [p.label for p in got] == [p["label"] for p in expected[:top_k or 5]], name
                assert np.allclose([p.score for p in got], [p["score"] for p in expected[:top_k or 5]],
                                   rtol=1e-4, atol=0), name


def open_connection(url: str, sent: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    connection.sendall(sent)
    return connection


def read_until_closed(connection: socket.socket, time_limit_s: float) -> bytes:
    """What the service sends on `connection` until it closes it (or the time limit)."""
    received, deadline = b"", time.monotonic() + time_limit_s
    try:
        while time.monotonic() < deadline:
            connection.settimeout(max(0.1, deadline - time.monotonic()))
            piece = connection.recv(65536)
            if not piece:
                break
            received += piece
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def timed_request(url: str, body: bytes | None = None) -> tuple[int, bytes, float]:
    began = time.monotonic()
    try:
        status, answer = request(url, body, timeout=ANSWER_TIMEOUT_S)
    except OSError as err:  # a timeout: the service did not answer
        return 0, str(err).encode(), time.monotonic() - began
    return status, answer, time.monotonic() - began


def test_idle_and_slow_clients_leave_the_service_answering(service, reference, photos):
    """50 connections that stop within their headers and 20 that send their body a byte at a
    time hold nothing a request needs (they once held the replica's every slot); the service
    then closes them, each with its 408."""
    url = service[0]
    content = photos["coffee"].read_bytes()
    idle = [open_connection(url, b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Len") for _ in range(50)]
    slow = [open_connection(url, b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n")
            for _ in range(20)]
    began, stop = time.monotonic(), threading.Event()

    def trickle() -> None:
        while not stop.wait(0.5):
            for connection in slow:
                with contextlib.suppress(OSError):
                    connection.sendall(b"x")

    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        time.sleep(1)
        answers = {path: timed_request(url + path, body) for path, body in (("/health", None), ("/predict", content))}
        assert [status for status, _, _ in answers.values()] == [200, 200], answers
        assert max(took for _, _, took in answers.values()) < ANSWER_TIMEOUT_S, answers
        assert_as_pipeline(answers["/predict"][1], reference(str(photos["coffee"])))
        stop.set()
        trickler.join()
        deadline = began + max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S) + 10
        for connections, words in ((idle, b"headers"), (slow, b"body")):
            for connection in connections:
                answer = read_until_closed(connection, deadline - time.monotonic())
                assert answer.startswith(b"HTTP/1.1 408 ") and words in answer, answer[:300]
        assert time.monotonic() < deadline
    finally:
        stop.set()
        trickler.join()
        for connection in idle + slow:
            connection.close()


def test_an_idle_keep_alive_connection_is_closed(service):
    host, port = service[0].removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", "/health")
        answer = connection.getresponse()
        assert answer.status == 200 and not answer.will_close
        answer.read()
        began = time.monotonic()
        assert read_until_closed(connection.sock, KEEP_ALIVE_S + 10) == b""  # closed, not timed out:
        assert time.monotonic() - began < KEEP_ALIVE_S + 10
    finally:
        connection.close()


def proxy_process(service_process: subprocess.Popen) -> psutil.Process:
    """Ray Serve's HTTP proxy, the process that reads what clients send."""
    found = [p for p in psutil.Process(service_process.pid).children(recursive=True)
             if "ProxyActor" in " ".join(p.cmdline())]
    assert len(found) == 1, found
    return found[0]


def test_64_mb_of_headers_get_431_and_the_proxy_memory_stays_bounded(service, reference, photos):
    """Headers sent on and on are refused once over the limit: the proxy keeps no more of them
    (it once answered 200, 200 MB larger)."""
    url, process, _ = service
    proxy = proxy_process(process)
    before, line, sent = proxy.memory_info().rss, b"X-Filler: " + b"a" * 8_000 + b"\r\n", 0
    with open_connection(url, b"GET /health HTTP/1.1\r\nHost: localhost\r\n") as connection:
        try:
            while sent < 64 * 2**20 and not select.select([connection], [], [], 0)[0]:
                connection.sendall(line * 128)
                sent += len(line) * 128
            if sent >= 64 * 2**20:
                connection.sendall(b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the service stopped reading after its answer
        answer = http.client.HTTPResponse(connection)
        answer.begin()
        assert answer.status == 431
        assert "headers" in json.loads(answer.read())["error"]
    assert sent < 8 * 2**20  # refused while it was coming
    assert proxy.memory_info().rss - before < 16 * 2**20
    status, answer = request(f"{url}/predict", photos["chelsea"].read_bytes())
    assert status == 200
    assert_as_pipeline(answer, reference(str(photos["chelsea"])))


def slow_png() -> bytes:
    """16 Mpx that compress to some 60 KB: a replica's thread takes a good part of a second to
    decode each."""
    ramp = np.linspace(0, 255, 4000).astype(np.uint8)
    pixels = np.stack([np.broadcast_to(ramp, (4000, 4000)), np.broadcast_to(ramp[:, None], (4000, 4000)),
                       np.full((4000, 4000), 128, np.uint8)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_saturated_replica_answers_503_with_retry_after_and_health_still_answers(service):
    """More images at once than a replica admits: the others get 503 with Retry-After at once,
    never silence; /health answers meanwhile."""
    url, content = service[0], slow_png()
    clients, answers = CAPACITY + 8, []  # under the requests one address may have in progress
    start = threading.Barrier(clients + 1)

    def client() -> None:
        start.wait()
        answers.append(request_with_headers(f"{url}/predict", content, timeout=120))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(0.5)
    health, _, took = timed_request(f"{url}/health")
    for thread in threads:
        thread.join(180)
    assert health == 200 and took < ANSWER_TIMEOUT_S, took
    statuses = Counter(status for status, _, _ in answers)
    assert len(answers) == clients and set(statuses) <= {200, 503} and statuses[503] >= 1, statuses
    for status, answer, headers in answers:
        if status == 503:
            assert headers.get("retry-after") == "1" and "busy" in json.loads(answer)["error"]


def test_one_address_has_at_most_its_limit_of_requests_in_progress(service, reference, photos):
    """Over --max-client-requests requests in progress from one address, the next gets 429 with
    Retry-After; the requests whose clients left mid-body free their places, uncounted."""
    url = service[0]
    responses_before = json.loads(request(f"{url}/info")[1])["responses"]
    held = [open_connection(url, b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n")
            for _ in range(MAX_CLIENT_REQUESTS)]
    try:
        deadline, status = time.monotonic() + 30, 0
        while status != 429 and time.monotonic() < deadline:  # until the proxy has read every head
            status, answer, headers = request_with_headers(f"{url}/health")
        assert status == 429 and headers.get("retry-after") == "1", answer
        assert "in progress" in json.loads(answer)["error"]
    finally:
        for connection in held:
            connection.close()
    deadline, status = time.monotonic() + 30, 0
    while status != 200 and time.monotonic() < deadline:
        status, answer = request(f"{url}/predict", photos["chelsea"].read_bytes())
    assert status == 200
    assert_as_pipeline(answer, reference(str(photos["chelsea"])))
    responses = json.loads(request(f"{url}/info")[1])["responses"]
    assert responses.get("500", 0) == responses_before.get("500", 0)


def test_attention_is_the_rollout_png(service, model_dir, photos):
    from cvt.modeling.attention_maps import attention_maps, draw
    from cvt.images import load_image_bytes
    from cvt.serve import OVERLAY_SIZE

    content = photos["astronaut"].read_bytes()
    status, answer = request(f"{service[0]}/attention", content)
    assert status == 200
    picture = Image.open(io.BytesIO(answer))
    assert picture.format == "PNG" and picture.size == (OVERLAY_SIZE, OVERLAY_SIZE)
    processor = cvt.CvtImageProcessor.from_pretrained(model_dir)
    expected = draw(attention_maps(cvt.load(str(model_dir)), load_image_bytes(content), processor), "rollout",
                    size=OVERLAY_SIZE)
    difference = np.abs(np.asarray(picture, np.int16) - np.asarray(expected, np.int16))
    assert difference.max() <= 2  # float sums in another thread count may round a pixel differently


def test_info_counts_the_requests_and_the_batches(service, reference, photos, model_dir):
    url = service[0]
    before = json.loads(request(f"{url}/info")[1])
    assert before["model"] == model_dir.name  # the folder's name: the server's paths are not shown
    assert before["labels"] == reference.labels and before["input_size"] == 64
    assert (before["engine"], before["precision"]) == (reference.engine.name, "fp32")
    content, answers = photos["chelsea"].read_bytes(), []
    clients = [threading.Thread(target=lambda: answers.append(request(f"{url}/predict", content)))
               for _ in range(6)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(60)
    assert [status for status, _ in answers] == [200] * 6
    after = json.loads(request(f"{url}/info")[1])

    def classified(info: dict) -> int:
        return sum(int(size) * count for size, count in info["batch_sizes"].items())

    assert classified(after) - classified(before) == 6
    assert after["responses"]["200"] - before["responses"].get("200", 0) == 6 + 1  # and the first /info


def test_a_replica_runs_as_many_threads_as_its_cpus_and_batches_form_under_load(service, photos):
    """--cpus-per-replica 2: the engine runs two threads, and 16 clients at once share forward
    passes (a replica of one engine thread decoding on the same pool once formed batches of one)."""
    url = service[0]
    before = json.loads(request(f"{url}/info")[1])
    assert before["threads"] == CPUS_PER_REPLICA
    content, answers = photos["astronaut"].read_bytes(), []

    def client() -> None:
        for _ in range(4):
            answers.append(request(f"{url}/predict", content)[0])

    clients = [threading.Thread(target=client) for _ in range(16)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(120)
    assert answers == [200] * 64
    after = json.loads(request(f"{url}/info")[1])
    sizes = Counter({int(size): count for size, count in after["batch_sizes"].items()})
    sizes.subtract({int(size): count for size, count in before["batch_sizes"].items()})
    images, batches = sum(size * count for size, count in sizes.items()), sum(sizes.values())
    assert images == 64
    assert images / batches > 1, sizes


def test_the_private_ray_instance_asks_for_a_token(service):
    """Ray's processes listen on every interface (Ray has no setting for it): the instance
    `cvt serve` starts runs with Ray's token authentication, so they answer no one without it."""
    _, process, _ = service
    gcs = [p for p in psutil.Process(process.pid).children(recursive=True) if "gcs_server" in " ".join(cmdline(p))]
    assert len(gcs) == 1 and gcs[0].environ().get("RAY_AUTH_MODE") == "token"


def test_the_replicas_run_the_endpoints_on_their_main_event_loop(service):
    """Ray Serve's throughput settings reach the replicas and the proxy of the instance `cvt serve`
    starts: no second event loop in another thread (and no hop to it and back for each request),
    gRPC from the proxy to the replicas."""
    _, process, _ = service
    serve_actors = [p for p in psutil.Process(process.pid).children(recursive=True)
                    if "ServeReplica" in " ".join(cmdline(p)) or "ProxyActor" in " ".join(cmdline(p))]
    assert len(serve_actors) == 2
    for actor in serve_actors:
        assert actor.environ().get("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD") == "0"
        assert actor.environ().get("RAY_SERVE_USE_GRPC_BY_DEFAULT") == "1"


def test_an_unexpected_error_is_a_500_without_its_traceback(caplog):
    from starlette.requests import Request

    from cvt.serve import answers

    class Replica:
        responses: dict = {"500": 0}

    @answers
    async def broken(self, request):
        raise RuntimeError("a bug with a secret path /home/someone/model")

    request = Request({"type": "http", "method": "POST", "path": "/predict", "headers": [], "query_string": b""})
    response = asyncio.run(broken(Replica(), request))
    assert response.status_code == 500
    assert b"Traceback" not in response.body and b"secret" not in response.body
    assert json.loads(response.body)["error"].startswith("internal error")
    assert "Traceback" in caplog.text and "a bug with a secret path" in caplog.text
    assert Replica.responses["500"] == 1


def test_an_upload_decodes_as_its_file_does(photos, tmp_path):
    from cvt.images import ImageError, load_image, load_image_bytes

    content = photos["coffee"].read_bytes()
    assert np.array_equal(np.asarray(load_image_bytes(content)), np.asarray(load_image(photos["coffee"])))
    (tmp_path / "cut.jpg").write_bytes(content[:len(content) // 3])
    with pytest.raises(ImageError) as from_file:
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError) as from_bytes:
        load_image_bytes(content[:len(content) // 3], name="upload.jpg")
    assert str(from_bytes.value) == str(from_file.value).replace(str(tmp_path / "cut.jpg"), "upload.jpg")


def test_bad_options_are_refused_before_ray_starts(model_dir, capsys):
    for option, value in (("--replicas", "0"), ("--max-batch-size", "0"), ("--port", "70000"),
                          ("--batch-wait-ms", "-1"), ("--max-body-mb", "0"), ("--header-timeout-s", "0"),
                          ("--body-timeout-s", "-1"), ("--keep-alive-s", "0"), ("--max-client-requests", "0"),
                          ("--cpus-per-replica", "0"), ("--route-prefix", "cats"), ("--route-prefix", "/cats/"),
                          ("--name", "two words")):
        assert main(["serve", str(model_dir), option, value]) == 2
        assert f"{option} must" in capsys.readouterr().err  # cvt's message, not argparse's


def test_the_service_runs_the_model_as_its_run_settings_say(model_dir):
    """The service's settings hold a `cvt.RunSettings` (its defaults, its checks): a bad engine
    setting given to `serve run` is refused before Ray starts, naming it."""
    from cvt.serve import Settings, check_settings

    assert Settings(model="m").run == cvt.RunSettings()
    run = cvt.RunSettings(engine="torch", precision="bf16", device="cpu", image_size=48, batch_size=3)
    assert Settings.from_run("m", run, replicas=2).run == run
    with pytest.raises(cvt.InvalidValueError, match="unknown precision 'int4'"):
        check_settings(Settings(model=str(model_dir), precision="int4"))
    with pytest.raises(cvt.InvalidValueError, match="image_size must be"):
        check_settings(Settings(model=str(model_dir), image_size=0))


BLOCK_RAY = """
import importlib.abc, sys
class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoRay())
from cvt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_ray_cvt_serve_names_the_extra_to_install(model_dir):
    done = subprocess.run([sys.executable, "-c", BLOCK_RAY, "serve", str(model_dir)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == \
        'cvt: error: cvt.serve needs Ray Serve: pip install "cvt-vision[serve]"'


@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_page_shows_the_top_label_in_a_browser(service, reference, photos, model_dir, tmp_path_factory):
    """Before an upload, no result (no broken pictures); after one, the top labels and the
    rollout; after a bad file, its error alone. The header names the model, not its path."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1100,900"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        browser.get(service[0] + "/")
        header = browser.find_element(By.ID, "model")
        WebDriverWait(browser, 30).until(lambda b: "labels" in header.text)
        assert header.text.startswith(model_dir.name + " · ") and str(model_dir.parent) not in header.text
        assert not browser.find_element(By.ID, "result").is_displayed()
        assert not browser.find_element(By.ID, "photo").is_displayed()
        browser.find_element(By.ID, "file").send_keys(str(photos["chelsea"]))
        WebDriverWait(browser, 60).until(
            lambda b: b.execute_script("return document.body.classList.contains('done') && "
                                       "document.getElementById('overlay').complete") or
            "error" in b.find_element(By.ID, "status").get_attribute("class"))
        assert "error" not in browser.find_element(By.ID, "status").get_attribute("class"), \
            browser.find_element(By.ID, "status").text
        assert browser.find_element(By.ID, "result").is_displayed()
        labels = browser.find_elements(By.CSS_SELECTOR, "#labels .label")
        assert labels[0].text == reference(str(photos["chelsea"]))[0]["label"]
        assert len(labels) == 5
        assert browser.execute_script("return document.getElementById('overlay').naturalWidth") > 0
        screenshot = tmp_path_factory.mktemp("browser") / "serve_page.png"
        assert browser.save_screenshot(str(screenshot))
        print(f"screenshot of the page: {screenshot}")
        not_an_image = screenshot.parent / "notes.jpg"
        not_an_image.write_text("not an image\n")
        browser.find_element(By.ID, "file").send_keys(str(not_an_image))
        WebDriverWait(browser, 60).until(lambda b: "error" in b.find_element(By.ID, "status").get_attribute("class"))
        assert "not an image" in browser.find_element(By.ID, "status").text
        assert not browser.find_element(By.ID, "result").is_displayed()
        assert not browser.find_elements(By.CSS_SELECTOR, "#labels .label")
    finally:
        browser.quit()


def assert_stops_leaving_nothing(process: subprocess.Popen, log: Path, signum: int, whole_group: bool) -> None:
    """Send `signum` to the command (or its whole process group, as Ctrl-C in a terminal does):
    it must end with status 0 within 5 s, with every process Ray started gone."""
    started = psutil.Process(process.pid).children(recursive=True)  # Ray's processes, in several groups
    assert started, "cvt serve started no Ray process"
    began = time.monotonic()
    (os.killpg if whole_group else os.kill)(process.pid, signum)
    process.wait(STOP_TIMEOUT_S + 5)
    _, alive = psutil.wait_procs(started, timeout=max(0.1, STOP_TIMEOUT_S - (time.monotonic() - began)))
    took = time.monotonic() - began
    assert not alive, f"still running: {[p.pid for p in alive]}"
    assert took < STOP_TIMEOUT_S, f"stopped in {took:.1f} s"
    in_group = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == process.pid]
    assert not in_group, f"left in the process group: {in_group}"
    assert process.returncode == 0, log.read_text()[-3000:]  # a service's normal end
    assert f"cvt: stopping (by {signal.Signals(signum).name})" in log.read_text()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_sigterm_stops_the_service_within_5_s_leaving_no_process(service):
    """Last of the tests on the shared service: it stops it."""
    _, process, log = service
    assert_stops_leaving_nothing(process, log, signal.SIGTERM, whole_group=False)


# moments of start-up, by what the command has started by then: Ray's GCS (ray.init then goes on
# starting the raylet and its agents), Serve's controller or proxy. A tenth of a second later, off
# the fork that started it: CPython drops an exception raised by a signal handler while it runs
# the fork's hooks (a window of microseconds a test sending its signal as it sees a new process
# would hit every time).
START_UP_MOMENTS = {
    "starting Ray": lambda names: any("gcs_server" in name for name in names),
    "starting Serve": lambda names: any("ServeController" in name or "ProxyActor" in name for name in names),
}


@pytest.mark.parametrize("moment", [pytest.param(moment, marks=[pytest.mark.slow] if moment == "starting Serve" else [])
                                    for moment in START_UP_MOMENTS])
def test_sigterm_during_start_up_exits_0_within_5_s_leaving_no_process(model_dir, reference, tmp_path, moment):
    """SIGTERM while Ray starts (whose own handler would exit with status 15, its processes left
    running) or while Serve deploys: the normal end all the same."""
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "cvt", "serve", str(model_dir), "--port", str(free_port())],
                                   stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            seen.update(descendants(process))
            if START_UP_MOMENTS[moment]([" ".join(cmdline(p)) for p in seen.values()]):
                break
            time.sleep(0.02)
        time.sleep(0.1)
        assert process.poll() is None, log.read_text()[-3000:]
        began = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        while process.poll() is None and time.monotonic() - began < STOP_TIMEOUT_S + 5:
            seen.update(descendants(process))  # what it still starts meanwhile
            time.sleep(0.02)
        took = time.monotonic() - began
        _, alive = psutil.wait_procs(list(seen.values()), timeout=max(0.1, STOP_TIMEOUT_S - took))
        assert process.returncode == 0, (process.returncode, log.read_text()[-3000:])
        assert took < STOP_TIMEOUT_S, f"stopped in {took:.1f} s"
        assert not alive, f"still running: {[cmdline(p)[:2] for p in alive]}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for left in seen.values():
            with contextlib.suppress(psutil.Error):
                left.kill()


def descendants(process: subprocess.Popen) -> dict[int, psutil.Process]:
    try:
        return {p.pid: p for p in psutil.Process(process.pid).children(recursive=True)}
    except psutil.Error:
        return {}


def cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_it_too(model_dir, reference, tmp_path):
    """Ray's own processes get the signal too (most of them share the group): the command must
    not wait for them."""
    port, log = free_port(), tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "cvt", "serve", str(model_dir), "--port", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process, log)
        assert_stops_leaving_nothing(process, log, signal.SIGINT, whole_group=True)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


# Ray Serve's own tools and several services on one cluster: a cluster of this module's own
# (`ray start --head --block`: ending that process stops exactly this node), started as Ray starts
# one by default when a token is at hand: with token authentication, and no RAY_AUTH_MODE set.


@contextlib.contextmanager
def ray_head(env: dict[str, str], dashboard: bool = True):
    """A head node on 127.0.0.1 in a folder of its own, with its dashboard (where `serve deploy`
    sends a config file) unless told: yields (its address, the dashboard's URL)."""
    port, dashboard_port = free_port(), free_port()
    temp = Path(tempfile.mkdtemp(prefix="cvt-serve-", dir="/tmp"))  # short: Ray's socket paths
    log = temp / "start.log"
    with open(log, "wb") as out:
        node = subprocess.Popen(["ray", "start", "--head", "--block", "--port", str(port), "--node-ip-address",
                                 "127.0.0.1", "--num-cpus", "6", "--temp-dir", str(temp), "--disable-usage-stats",
                                 f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host", "127.0.0.1",
                                 "--dashboard-port", str(dashboard_port), "--dashboard-agent-listen-port", "0",
                                 "--ray-client-server-port", str(free_port())],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=temp)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert node.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"
    finally:
        node.terminate()
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            node.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """(the cluster's address, its dashboard's URL, the Serve HTTP port its services share, the
    environment its clients run in: the cluster's token at hand, RAY_AUTH_MODE unset)."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_AUTH_MODE"}
    env.update(RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    with ray_head(env) as (address, dashboard):
        yield address, dashboard, free_port(), env


def start_cvt_serve(*arguments: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "cvt", "serve", *arguments], stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True, env=env)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the service's process group, SIGKILL if it is still there after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def serve_cli(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Ray Serve's `serve` command, as a client of a token cluster runs it (Ray's documented
    RAY_AUTH_MODE=token beside the token)."""
    done = subprocess.run(["serve", *arguments], capture_output=True, text=True, timeout=START_TIMEOUT_S,
                          env={**env, "RAY_AUTH_MODE": "token"}, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def wait_for_url(url: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
            if answer.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{url} did not become healthy in {timeout} s")


@pytest.mark.slow
def test_a_token_at_hand_still_connects_to_a_cluster_without_authentication():
    """`--ray` uses a token at hand when RAY_AUTH_MODE is unset (above); a cluster started with
    authentication disabled accepts such a client all the same."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    client = {name: value for name, value in env.items() if name != "RAY_AUTH_MODE"}
    client["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    with ray_head(env, dashboard=False) as (address, _):
        code = f"import ray; from cvt.ray import connect; connect({address!r}); print(ray.cluster_resources()['CPU'])"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=START_TIMEOUT_S, env=client, check=False)
    assert done.returncode == 0 and done.stdout.split()[-1] == "6.0", done.stderr[-3000:]


@pytest.mark.slow
def test_serve_run_and_serve_deploy_serve_the_model(cluster, model_dir, reference, photos, tmp_path):
    """`serve run cvt.serve:app model=FOLDER ...` (typed arguments, given as text) and a
    `serve deploy` config file with `num_replicas: auto` each serve the model on the cluster."""
    address, dashboard, port, env = cluster
    serve_cli("start", "--address", address, "--http-host", "127.0.0.1", "--http-port", str(port), env=env)
    serve_cli("run", "--address", address, "--non-blocking", "--name", "by-serve-run", "--route-prefix", "/run",
              "cvt.serve:app", f"model={model_dir}", "engine=torch", "max_batch_size=4", env=env)
    config = tmp_path / "serve.yaml"
    config.write_text(f"""
http_options:
  host: 127.0.0.1
  port: {port}
applications:
  - name: by-serve-deploy
    route_prefix: /deployed
    import_path: cvt.serve:app
    args:
      model: {model_dir}
      max_batch_size: 4
    deployments:
      - name: CvtService
        num_replicas: auto
        autoscaling_config:
          min_replicas: 1
          max_replicas: 2
""")
    serve_cli("deploy", str(config), "--address", dashboard, env=env)
    try:
        for prefix in ("/run", "/deployed"):
            url = f"http://127.0.0.1:{port}{prefix}"
            wait_for_url(url)
            for path in photos.values():
                status, answer = request(f"{url}/predict", path.read_bytes())
                assert status == 200, answer
                assert_as_pipeline(answer, reference(str(path)))
    finally:  # Serve leaves the cluster with its applications: the next test starts it afresh
        serve_cli("shutdown", "--address", dashboard, "--yes", env=env)


@pytest.mark.slow
def test_two_services_share_a_cluster_and_stopping_one_leaves_the_other(cluster, model_dir, reference, photos,
                                                                        tmp_path):
    """Two `cvt serve --ray` on one cluster (connecting with the token at hand, as `ray start`
    does) serve two models under two route prefixes of the cluster's one HTTP port; one asking
    for another port is refused, naming the cluster's; SIGTERM to one deletes its application
    only, and the other goes on answering."""
    address, _, port, env = cluster
    other_dir = save_tiny_classifier(tmp_path / "other", seed=2)
    other = cvt.pipeline("image-classification", str(other_dir))
    first = start_cvt_serve(str(model_dir), "--ray", address, "--port", str(port), env=env, log=tmp_path / "first.txt")
    second = None
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_url(base)
        elsewhere = subprocess.run([sys.executable, "-m", "cvt", "serve", str(other_dir), "--ray", address,
                                    "--port", str(free_port())], capture_output=True, text=True, timeout=START_TIMEOUT_S,
                                   env=env, check=False)
        assert elsewhere.returncode == 2, elsewhere.stderr[-3000:]
        assert f"listens on 127.0.0.1:{port}" in elsewhere.stderr and "--route-prefix" in elsewhere.stderr
        same_prefix = subprocess.run([sys.executable, "-m", "cvt", "serve", str(other_dir), "--ray", address,
                                      "--port", str(port), "--name", "another"], capture_output=True, text=True,
                                     timeout=START_TIMEOUT_S, env=env, check=False)
        assert same_prefix.returncode == 2 and "--route-prefix / is taken" in same_prefix.stderr, \
            same_prefix.stderr[-3000:]
        second = start_cvt_serve(str(other_dir), "--ray", address, "--port", str(port), "--route-prefix", "/other",
                                 env=env, log=tmp_path / "second.txt")
        wait_for_url(f"{base}/other")
        with urllib.request.urlopen(f"{base}/other", timeout=30) as page:  # the page's links are relative:
            assert page.url == f"{base}/other/" and b"static/app.js" in page.read()  # it needs the slash
        assert request(f"{base}/other/static/app.js")[0] == 200
        for url, pipe in ((base, reference), (f"{base}/other", other)):
            status, answer = request(f"{url}/predict", photos["coffee"].read_bytes())
            assert status == 200, answer
            assert_as_pipeline(answer, pipe(str(photos["coffee"])))
        began = time.monotonic()
        os.kill(first.pid, signal.SIGTERM)
        assert first.wait(STOP_TIMEOUT_S + 5) == 0, (tmp_path / "first.txt").read_text()[-3000:]
        assert time.monotonic() - began < STOP_TIMEOUT_S
        status, answer = request(f"{base}/other/predict", photos["chelsea"].read_bytes())
        assert status == 200, answer
        assert_as_pipeline(answer, other(str(photos["chelsea"])))
        deadline, status = time.monotonic() + 30, 200
        while status != 404 and time.monotonic() < deadline:  # the first one's application is gone
            status, _ = request(f"{base}/predict", photos["chelsea"].read_bytes())
            time.sleep(0.5)
        assert status == 404
    finally:
        stop(first)
        if second is not None:
            stop(second)
