"""The SeaweedFS server behind tests, benchmarks, drills and ``scripts/stack`` (``storage.seaweed``)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import psutil
import pytest
from minio.error import S3Error

from storage.seaweed import SeaweedFS
from tests import services


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with services.seaweed(tmp_path_factory.mktemp("seaweedfs")) as started:
        yield started


@pytest.fixture
def killable(tmp_path: Path) -> Iterator[SeaweedFS]:
    with services.seaweed(tmp_path / "seaweedfs") as started:
        yield started


def test_the_server_listens_on_loopback_only_and_only_on_the_ports_chosen_for_it(server: SeaweedFS) -> None:
    assert server.pid is not None
    listening = {conn.laddr for conn in psutil.Process(server.pid).net_connections(kind="inet")
                 if conn.status == psutil.CONN_LISTEN}
    assert listening, "weed mini listens somewhere"
    assert {address.ip for address in listening} == {"127.0.0.1"}
    chosen = set(astuple(server.ports))
    assert len(chosen) == len(astuple(server.ports)), "every component has a port of its own"
    assert {address.port for address in listening} <= chosen


def test_telemetry_webdav_iceberg_lance_and_the_admin_ui_are_off(server: SeaweedFS) -> None:
    command = server.command()
    for flag in ("-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                 "-admin.ui=false", "-s3.autoCreateBucket=false", "-ip.bind=127.0.0.1"):
        assert flag in command


def test_an_upload_to_a_missing_bucket_is_refused_rather_than_creating_it(server: SeaweedFS) -> None:
    client = server.client()
    with pytest.raises(S3Error) as refused:
        client.put_object("never-created", "a/b.json", io.BytesIO(b"{}"), 2)
    assert refused.value.code == "NoSuchBucket"
    assert client.list_buckets() == []


def test_objects_survive_a_sigkill_and_a_restart_on_the_same_directory_and_ports(killable: SeaweedFS) -> None:
    server = killable
    client = server.client()
    client.make_bucket("survivors")
    client.put_object("survivors", "acme/day.json", io.BytesIO(b'{"kept": true}'), 14)
    endpoint, killed = server.endpoint, server.pid

    server.kill()
    assert not server.running()
    server.start()

    assert server.endpoint == endpoint and server.pid != killed
    response = server.client().get_object("survivors", "acme/day.json")
    try:
        assert response.read() == b'{"kept": true}'
    finally:
        response.close()
        response.release_conn()
