"""`cvt predict` with object storage: images read from an S3 bucket by Ray's actors, results
written to a bucket, against a local S3 server (moto's, on 127.0.0.1); a missing bucket is one
line before any work."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from cvt.cli import main
from conftest import RAY_TESTS, save_tiny_classifier

pytestmark = RAY_TESTS  # the Ray run below shares the ray tests' worker

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")
BUCKET = "photos-bucket"


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 (stopped at the end) and the environment that points the
    AWS clients at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bucket(s3_env, tmp_path_factory) -> Path:
    """The bucket `photos-bucket` holding scikit-image's photographs under photos/ (one in a
    sub-prefix), a text file named .jpg and a hidden object; the same files in a local folder,
    which this returns."""
    import boto3

    local = tmp_path_factory.mktemp("local") / "photos"
    (local / "more").mkdir(parents=True)
    for i, name in enumerate(PHOTOS):
        Image.fromarray(getattr(skimage_data, name)()).save(local / ("more" if i == 0 else "") / f"{name}.jpg")
    (local / "text.jpg").write_text("not a JPEG")
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    for path in local.rglob("*.jpg"):
        client.put_object(Bucket=BUCKET, Key=f"photos/{path.relative_to(local)}", Body=path.read_bytes())
    client.put_object(Bucket=BUCKET, Key="photos/.hidden.jpg", Body=b"never listed")
    return local


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("model"))


def s3_object(env: dict[str, str], key: str) -> bytes:
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def by_name(rows: list[dict], prefix: str) -> dict[str, dict]:
    """Rows keyed by their path after `prefix` (a bucket's and a folder's files compared)."""
    assert all(row["path"].startswith(prefix) for row in rows), [row["path"] for row in rows]
    return {row["path"][len(prefix):]: row for row in rows}


def assert_same(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert sorted(got) == sorted(want)
    for name, row in want.items():
        assert (got[name]["labels"], bool(got[name]["error"])) == (row["labels"], bool(row["error"])), name
        if row["scores"] is not None:
            assert np.allclose(got[name]["scores"], row["scores"], rtol=1e-5, atol=0), name


@pytest.fixture(scope="module")
def local_rows(model_dir, bucket, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("plain") / "plain.jsonl"
    assert main(["predict", str(model_dir), str(bucket), "--format", "jsonl", "--output", str(out),
                 "--engine", "torch"]) == 1  # text.jpg fails
    return by_name([json.loads(line) for line in out.read_text().splitlines()], f"{bucket}/")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_results_are_uploaded_to_a_bucket(model_dir, bucket, local_rows, s3_env, monkeypatch, fmt) -> None:
    """--output s3://bucket/key: the object holds the rows a local --output holds."""
    import pyarrow.parquet as pq

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    key = f"out/labels.{fmt}"
    assert main(["predict", str(model_dir), str(bucket), "--format", fmt, "--output", f"s3://{BUCKET}/{key}",
                 "--engine", "torch"]) == 1
    data = s3_object(s3_env, key)
    rows = (pq.read_table(io.BytesIO(data)).to_pylist() if fmt == "parquet"
            else [json.loads(line) for line in data.decode().splitlines()])
    assert_same(by_name(rows, f"{bucket}/"), local_rows)


def test_a_missing_bucket_is_one_line_before_any_work(model_dir, bucket, s3_env, monkeypatch, capsys,
                                                      tmp_path) -> None:
    """An input or --output in a bucket that does not exist: one line naming it, exit status 2,
    before Ray starts (the address reaches nothing: reaching it would be another error); images
    in storage without --ray: one line saying to add it."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    nowhere = "--ray=127.0.0.1:1"
    cases = [([f"s3://no-such-bucket/photos", nowhere], "the bucket 'no-such-bucket' does not exist"),
             ([str(bucket), "--output", "s3://no-such-bucket/out.jsonl", nowhere],
              "the bucket 'no-such-bucket' does not exist"),
             ([f"s3://{BUCKET}/nothing-here/", nowhere], "no such object or prefix"),
             ([f"s3://{BUCKET}/photos"], "add --ray")]
    for args, message in cases:
        assert main(["predict", str(model_dir), *args, "--format", "jsonl"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cvt: error: ") and message in err[0], err


@pytest.mark.slow
@pytest.mark.subprocess
def test_ray_reads_a_bucket_and_writes_to_a_bucket(model_dir, bucket, local_rows, s3_env) -> None:
    """`cvt predict s3://bucket/photos --ray --output s3://bucket/ray.jsonl`: the actors read the
    objects (a sub-prefix included, the hidden one skipped), and the uploaded rows equal a local
    run's, each path the object's URI, the broken object one error row."""
    env = {**os.environ, **s3_env, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-m", "cvt", "predict", str(model_dir), f"s3://{BUCKET}/photos",
                           "--format", "jsonl", "--output", f"s3://{BUCKET}/ray.jsonl", "--engine", "torch",
                           "--ray"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 1, done.stderr
    rows = [json.loads(line) for line in s3_object(s3_env, "ray.jsonl").decode().splitlines()]
    assert_same(by_name(rows, f"s3://{BUCKET}/photos/"), local_rows)
    assert "text.jpg" in done.stderr
    assert re.search(r"ray: 6 files on 1 actors of \d+ CPUs \(and engine threads\) each", done.stderr)


def test_credentials_the_store_refuses_are_one_line(model_dir, monkeypatch, capsys) -> None:
    """A store that checks credentials (moto's server with its access control on, in a process
    of its own) and keys it does not know: one line naming the refusal and the credentials,
    exit status 2, before Ray starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        deadline = time.monotonic() + 60
        while not _accepts(port):
            assert server.poll() is None and time.monotonic() < deadline, "moto's server did not start"
            time.sleep(0.2)
        for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "unknown",
                            "AWS_SECRET_ACCESS_KEY": "unknown", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(name, value)
        assert main(["predict", str(model_dir), "s3://a-bucket/photos", "--ray=127.0.0.1:1"]) == 2
    finally:
        server.kill()
        server.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cvt: error: s3://a-bucket/photos: cannot reach it: "), err
    assert "ACCESS_DENIED" in err[0] and "credentials" in err[0]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
