"""SeaweedFS (``weed server -s3``) for the tests: free ports that cannot collide, a start that waits
until a bucket takes writes and retries when weed exits on a port taken meanwhile, a stop that cleans up."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

WEED_PORTS = ("master", "volume", "filer", "s3")


def weed_ports() -> dict[str, int]:
    """Eight distinct free loopback ports for ``weed server``: its four HTTP ports and their gRPC ports.

    They come from below the kernel's ephemeral range, so an outgoing connection cannot take one
    between this check and weed's bind, and all eight are held while choosing, so none repeats.
    (weed's own default gRPC port, HTTP port + 10000, may land on another server's port.)
    """
    low, _ = (int(part) for part in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    names = [*WEED_PORTS, *(f"{name}.grpc" for name in WEED_PORTS)]
    held: list[socket.socket] = []
    chosen: dict[str, int] = {}
    try:
        for port in random.sample(range(10000, max(low, 20000)), 2000):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
            chosen[names[len(chosen)]] = port
            if len(chosen) == len(names):
                return chosen
    finally:
        for sock in held:
            sock.close()
    raise RuntimeError("no eight free ports found for SeaweedFS")


def weed_binary() -> str:
    candidate = Path(sys.executable).with_name("weed")
    return str(candidate) if candidate.exists() else (shutil.which("weed") or "weed")


def weed_command(data: Path, ports: dict[str, int], *extra: str) -> list[str]:
    """``weed server`` with its S3 gateway, on loopback and the given ports (``weed_ports``), logging into ``data``.

    Volumes are small, and the free-space floor is absolute: weed's default floor, 1 % of the disk,
    turns every volume read-only on a large, fairly full disk (puts then hang and fail with
    InternalError) although the tests write only megabytes.
    """
    port_flags = [f"-{name}.port={ports[name]}" for name in WEED_PORTS]
    port_flags += [f"-{name}.port.grpc={ports[name + '.grpc']}" for name in WEED_PORTS]
    return [
        weed_binary(),
        f"-logdir={data}",  # glog's files, else one set per start in /tmp (fatal lines still reach stderr)
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *port_flags,
        "-s3",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=8",
        "-volume.minFreeSpace=256MiB",
        *extra,
    ]


class WeedExited(RuntimeError):
    """weed stopped before it took writes: a port taken meanwhile, or a crash (its log says which)."""


def wait_until_writable(client, bucket: str, process: subprocess.Popen, data: Path, timeout: float) -> None:
    """Until ``bucket`` exists and an object can be written and read back (the gateway answers, and
    creates buckets, before the volume server takes writes); else WeedExited or RuntimeError saying why."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            try:
                client.create_bucket(Bucket=bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            client.put_object(Bucket=bucket, Key="readiness-probe", Body=b"1")
            client.get_object(Bucket=bucket, Key="readiness-probe")["Body"].read()
            return
        except Exception as exc:
            exited = process.poll() is not None
            if exited or time.monotonic() > deadline:
                free_mib = shutil.disk_usage(data).free // 2**20
                lines = (data / "weed.log").read_text(errors="replace").splitlines(keepends=True)
                fatal = "".join(line for line in lines if re.match(r"F\d{4} ", line))  # glog's fatal lines
                reason = f"exited with code {process.returncode}" if exited else "does not take writes"
                error = WeedExited if exited else RuntimeError
                raise error(
                    f"SeaweedFS in {data} {reason} ({exc!r}); {free_mib} MiB free on its disk; "
                    f"weed.log's fatal lines:\n{fatal}and its end:\n{''.join(lines[-15:])}"
                ) from None
            time.sleep(0.3)


def start_weed(
    data: Path,
    client_for: Callable[[str], object],
    bucket: str,
    *extra: str,
    ports: dict[str, int] | None = None,
    timeout: float = 90,
    attempts: int = 3,
) -> tuple[subprocess.Popen, dict[str, int]]:
    """``weed server -s3`` with its store in ``data/weed`` and its log appended to ``data/weed.log``;
    returns (process, ports) once ``bucket`` takes writes (``client_for(endpoint)`` makes the client).

    Given ``ports`` (a restart on the same store) it tries once. Otherwise each try gets fresh
    ``weed_ports`` and an empty store: weed exits when a port it binds was taken after we chose it.
    """
    failures: list[str] = []
    for _ in range(1 if ports else attempts):
        chosen = ports or weed_ports()
        store = data / "weed"
        if ports is None:
            shutil.rmtree(store, ignore_errors=True)
        store.mkdir(exist_ok=True)
        with open(data / "weed.log", "ab") as log:
            process = subprocess.Popen(weed_command(store, chosen, *extra), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_writable(client_for(f"http://127.0.0.1:{chosen['s3']}"), bucket, process, data, timeout)
            return process, chosen
        except WeedExited as exc:
            failures.append(str(exc))
            stop_weed(process, chosen)
        except BaseException:
            stop_weed(process, chosen)
            raise
    raise RuntimeError(f"SeaweedFS exited before it took writes, {len(failures)} times:\n" + "\n".join(failures))


def stop_weed(process: subprocess.Popen, ports: dict[str, int], crash: bool = False, grace: float = 5) -> None:
    """SIGKILL with ``crash`` (an outage, no goodbye), else SIGTERM and SIGKILL after ``grace`` seconds; then
    delete the Unix sockets weed leaves in /tmp for its ports (``seaweedfs-<server>-[grpc-]<port>.sock``, only
    two of which have a flag to put them elsewhere)."""
    if crash:
        process.kill()
    else:
        process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    for port in ports.values():
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            path.unlink(missing_ok=True)


def s3_client(endpoint: str, **credentials: str):
    """A boto3 client that gives up on a request within seconds (for readiness polls)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 1}, read_timeout=10, connect_timeout=5),
        **credentials,
    )


@contextmanager
def seaweedfs_server(data: Path, bucket: str, access_key: str, secret_key: str) -> Iterator[str]:
    """A SeaweedFS server in ``data`` whose S3 gateway checks every signature against one identity,
    with ``bucket`` taking writes; yields the endpoint URL. The identity is the process's AWS
    credentials meanwhile (as the code under test reads them), restored afterwards."""
    # With an identity configured, SeaweedFS checks every signature (anonymous requests and
    # links signed for another host are refused), as AWS and MinIO do.
    s3_config = data / "s3.json"
    s3_config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": access_key,
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_DEFAULT_REGION": "us-east-1"}
    )
    try:
        process, ports = start_weed(data, s3_client, bucket, f"-s3.config={s3_config}")
        try:
            yield f"http://127.0.0.1:{ports['s3']}"
        finally:
            stop_weed(process, ports, grace=15)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
