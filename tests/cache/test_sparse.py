"""Sparse files stay cheap: a 256 MiB raw disk holding 4 MiB of data is archived as about its data, sent
as that over S3, and restored sparse — never inflated on disk or on the wire."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eulerbake.store.signing import SecretKey
from eulerbake.store.substituters import archive_name
from tests.cache.conftest import MotoServer, Runner
from tests.cache.graph import make_graph

MiB = 2**20


def test_sparse_raw_over_s3(make_runner: Any, s3_url: str, upstream: Path, ci_key: SecretKey,
                            moto: MotoServer) -> None:
    graph = make_graph(upstream, size_mib=256, data_mib=4)
    a: Runner = make_runner("a", [s3_url])
    a.realise([graph.raw])
    disk = a.store.path(graph.raw) / "disk.raw"
    assert disk.stat().st_size == 256 * MiB and disk.stat().st_blocks * 512 <= 5 * MiB
    a.push([graph.source, graph.unpack, graph.raw], ci_key)

    meta = a.caches[0].read_entry(graph.raw.key)
    assert meta is not None
    assert meta["output"]["size"] > 256 * MiB and meta["archive"]["size"] < 4.5 * MiB
    assert meta["archive"]["data_bytes"] <= 4.5 * MiB
    bucket = s3_url.split("/")[2]
    head = moto.client().head_object(Bucket=bucket, Key="eulerbake/" + archive_name(meta["archive"]["hash"]))
    assert head["ContentLength"] == meta["archive"]["size"]  # what crosses the wire

    b: Runner = make_runner("b", [s3_url])
    fresh = make_graph(upstream, size_mib=256, data_mib=4)
    assert b.realise([fresh.raw])[fresh.raw.key].substituted and b.ran() == []
    restored = b.store.path(fresh.raw) / "disk.raw"
    assert restored.stat().st_size == 256 * MiB
    assert restored.stat().st_blocks * 512 <= 5 * MiB  # restored sparse
    assert restored.read_bytes() == disk.read_bytes()
