"""A local S3 server for tests: moto's standalone server on 127.0.0.1, on a free port."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalS3:
    """moto's ThreadedMotoServer on loopback; ``stop()``/``start()`` keep the stored objects
    (moto keeps them in this process), so a test can take the endpoint away for a while."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> "LocalS3":
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port,
                                          verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def env(self) -> dict[str, str]:
        """The standard variables our reader (boto3) takes its endpoint and credentials from."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}

    def upload(self, bucket: str, files: list[Path], prefix: str) -> list[str]:
        """Create ``bucket`` (once) and put ``files`` under ``prefix``; returns their URLs."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
            client.create_bucket(Bucket=bucket)
        urls = []
        for f in files:
            key = f"{prefix}/{os.path.basename(f)}"
            client.upload_file(str(f), bucket, key)
            urls.append(f"s3://{bucket}/{key}")
        return urls
