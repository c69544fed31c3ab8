"""Audit of an AMI published to moto's server: its eulerbake:key tag leads to the publication's entry, and
from there back to the disk's source file; the AMI is a subject of the provenance; no credential is in it.

Uses the publication tests' fixtures (moto server, the checking shim, fake credentials, test disks) and the
real AMI publisher through `Store.realise`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from eulerbake.cli.audit import audit_main
from eulerbake.core.publication import read_receipt
from eulerbake.provenance import dsse, provenance_path
from eulerbake.provenance.audit import RAW_PROVENANCE_TAG, audit_ami
from eulerbake.provenance.statement import write_provenance
from eulerbake.store.local import Store
from eulerbake.store.signing import SecretKey
from tests.publish.conftest import ACCESS_KEY, SECRET_KEY, Aws
from tests.publish.disks import REGION, RawDisk, ami_node, raw_node


def _nodes(tree: dict[str, Any]) -> list[dict[str, Any]]:
    return [tree, *(node for child in tree["children"] for node in _nodes(child))]


def test_audit_of_an_ami_finds_its_entry_by_the_key_tag_and_walks_to_the_disk(
        aws: Aws, disks: dict[str, RawDisk], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path / "store")
    disk = disks["x86_64"]
    raw = raw_node(disk)
    node = ami_node(raw, aws.endpoint, "x86_64")
    realised = store.realise(node, log=lambda _m: None)
    ami_id = read_receipt(realised.path)["resource"]["image_id"]
    key = SecretKey.generate("ci-aws-1")
    write_provenance(store, raw, key)
    path, envelope = write_provenance(store, node, key)

    # The AMI is a subject, with its ARN and the sha256 of the disk it holds; no credential anywhere.
    statement = dsse.verify(envelope, [key.public()]).statement
    assert statement is not None
    subjects = {s["name"]: s for s in statement["subject"]}
    disk_sha256 = hashlib.sha256(disk.path.read_bytes()).hexdigest()
    assert subjects[ami_id]["uri"] == f"arn:aws:ec2:{REGION}::image/{ami_id}"
    assert subjects[ami_id]["digest"]["sha256"] == disk_sha256
    assert statement["predicate"]["buildDefinition"]["buildType"] == "eulerbake:buildtype/publication/v1"
    target = statement["predicate"]["buildDefinition"]["externalParameters"]["target"]
    assert target["service"] == "aws-ami" and target["region"] == REGION
    for document in (path, provenance_path(store.path(raw))):
        text = document.read_bytes()
        assert SECRET_KEY.encode() not in text and ACCESS_KEY.encode() not in text

    # What the AWS publisher's tag will carry (see the report's patch): the disk's provenance sha256.
    ec2 = aws.direct("ec2")
    raw_envelope = dsse.sha256_of(provenance_path(store.path(raw)))
    ec2.create_tags(Resources=[ami_id], Tags=[{"Key": RAW_PROVENANCE_TAG, "Value": raw_envelope}])
    result = audit_ami(store, ami_id, [key.public()], ec2=ec2)
    assert result.ok, result.problems()
    tree = result.to_json()["tree"]
    assert tree["kind"] == "ami" and tree["label"] == ami_id
    (publication,) = tree["children"]
    assert publication["label"] == "ami:test:x86_64" and publication["info"]["key"] == node.key
    assert {c["name"] for c in publication["checks"]} >= {"tag", "receipt", "provenance tag", "signature", "subjects"}
    nodes = _nodes(tree)
    raw_entry = next(n for n in nodes if n["kind"] == "entry" and n["label"] == "test-raw:test:x86_64")
    assert raw_entry["info"]["key"] == raw.key
    (source,) = [n for n in nodes if n["kind"] == "file"]
    assert source["info"]["found"] == str(disk.path) and source["status"] == "pass"  # the sample's source

    # Through the CLI (no project here: the store from EULERBAKE_STORE), as a person would run it.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EULERBAKE_STORE", str(store.root))
    status = audit_main([ami_id, "--region", REGION, "--endpoint-url", aws.moto_url, "--trusted-key",
                         str(key.public()), "--json"])
    assert status == 0 and json.loads(capsys.readouterr().out)["ok"] is True
    status = audit_main([ami_id, "--region", REGION, "--endpoint-url", aws.moto_url, "--trusted-key",
                         str(key.public())])
    text = capsys.readouterr().out
    assert status == 0 and ami_id in text and "test-raw:test:x86_64" in text and "audit passed" in text

    # A tag that does not match the disk's provenance, or an AMI eulerbake did not make, fails.
    ec2.create_tags(Resources=[ami_id], Tags=[{"Key": RAW_PROVENANCE_TAG, "Value": "0" * 64}])
    assert not audit_ami(store, ami_id, [key.public()], ec2=ec2).ok
    foreign = ec2.register_image(Name="someone-elses", RootDeviceName="/dev/xvda", BlockDeviceMappings=[
        {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": read_receipt(realised.path)["resource"]["snapshot_id"]}}])
    other = audit_ami(store, foreign["ImageId"], [key.public()], ec2=ec2)
    assert not other.ok and "was not published by eulerbake" in other.problems()[0]
