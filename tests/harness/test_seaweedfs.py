"""The test SeaweedFS starts reliably: its ports cannot collide, and a port taken meanwhile costs a retry,
not a red run (CI once failed when weed exited on a taken port)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.harness import seaweedfs as harness

CREDENTIALS = {"aws_access_key_id": "harness", "aws_secret_access_key": "harness-secret", "region_name": "us-east-1"}


def client_for(endpoint: str):
    return harness.s3_client(endpoint, **CREDENTIALS)


@pytest.fixture(autouse=True)
def weed_credentials(monkeypatch):
    """weed's S3 gateway takes an identity from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` when they are
    set (the session's S3 fixture sets its own): the servers started here get the harness's pair."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])


def test_weed_gets_eight_distinct_free_ports_below_the_ephemeral_range():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = harness.weed_ports()
    assert sorted(ports) == sorted([*harness.WEED_PORTS, *(f"{name}.grpc" for name in harness.WEED_PORTS)])
    assert len(set(ports.values())) == 8
    assert all(10000 <= port < max(low, 20000) for port in ports.values())
    for port in ports.values():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    command = harness.weed_command(Path("/data"), ports)
    assert command[1] == "-logdir=/data"  # a global flag (before the command): no log files left in /tmp
    for name in harness.WEED_PORTS:
        assert f"-{name}.port={ports[name]}" in command
        assert f"-{name}.port.grpc={ports[name + '.grpc']}" in command


def test_a_port_taken_before_weed_binds_it_costs_a_retry_on_fresh_ports(tmp_path, monkeypatch):
    first = harness.weed_ports()
    taken = socket.socket()
    taken.bind(("127.0.0.1", first["filer.grpc"]))
    taken.listen()
    handed_out: list[dict[str, int]] = []

    def ports_with_the_first_set_taken() -> dict[str, int]:
        handed_out.append(first if not handed_out else real_weed_ports())
        return handed_out[-1]

    real_weed_ports = harness.weed_ports
    monkeypatch.setattr(harness, "weed_ports", ports_with_the_first_set_taken)
    try:
        process, ports = harness.start_weed(tmp_path, client_for, "retried", timeout=90)
    finally:
        taken.close()
    try:
        assert len(handed_out) == 2 and ports == handed_out[1] != first
        log = (tmp_path / "weed.log").read_text(errors="replace")
        assert f"{first['filer.grpc']}: bind: address already in use" in log
        client = client_for(f"http://127.0.0.1:{ports['s3']}")
        assert client.get_object(Bucket="retried", Key="readiness-probe")["Body"].read() == b"1"
    finally:
        harness.stop_weed(process, ports)
    left = [
        path for port in [*first.values(), *ports.values()] for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")
    ]
    assert not left


def test_a_restart_on_a_taken_port_fails_once_and_names_the_port(tmp_path):
    ports = harness.weed_ports()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["s3"]))
        taken.listen()
        with pytest.raises(RuntimeError) as failure:
            harness.start_weed(tmp_path, client_for, "restart", ports=ports, timeout=60)
    message = str(failure.value)
    assert "exited before it took writes, 1 times" in message
    assert f"{ports['s3']}: bind: address already in use" in message.split("fatal lines:")[1]
