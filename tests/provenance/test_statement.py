"""The provenance statements of the toy graph: in-toto v1 / SLSA v1 structure, what they record, and how one
byte of a patch moves through them.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from eulerbake.core.errors import EulerbakeError
from eulerbake.core.hashing import hash_json
from eulerbake.provenance import dsse
from eulerbake.provenance.statement import check_no_secrets, listing_digest, public_url
from tests.provenance.conftest import FAKE_AWS_SECRET, Keys, Project

HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
DIGEST_SET = {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string", "minLength": 1}}
URI = {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9+.-]*:"}
TIMESTAMP = {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"}
RESOURCE = {
    "type": "object",
    "properties": {"uri": URI, "digest": DIGEST_SET, "name": {"type": "string"}, "mediaType": {"type": "string"},
                   "downloadLocation": URI, "content": {"type": "string"}, "annotations": {"type": "object"}},
    "anyOf": [{"required": ["uri"]}, {"required": ["digest"]}, {"required": ["content"]}],
}
# in-toto Statement v1 + SLSA Provenance v1: the required fields and their types (no network, no bindings).
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["_type", "subject", "predicateType", "predicate"],
    "properties": {
        "_type": {"const": "https://in-toto.io/Statement/v1"},
        "subject": {"type": "array", "minItems": 1, "items": {
            "allOf": [RESOURCE, {"required": ["name", "digest"], "properties": {
                "digest": {"required": ["sha256"], "properties": {"sha256": HEX64}}}}]}},
        "predicateType": {"const": "https://slsa.dev/provenance/v1"},
        "predicate": {
            "type": "object",
            "required": ["buildDefinition", "runDetails"],
            "properties": {
                "buildDefinition": {
                    "type": "object",
                    "required": ["buildType", "externalParameters"],
                    "properties": {"buildType": URI, "externalParameters": {"type": "object"},
                                   "internalParameters": {"type": "object"},
                                   "resolvedDependencies": {"type": "array", "items": RESOURCE}},
                },
                "runDetails": {
                    "type": "object",
                    "required": ["builder"],
                    "properties": {
                        "builder": {"type": "object", "required": ["id"], "properties": {
                            "id": URI, "version": {"type": "object", "additionalProperties": {"type": "string"}},
                            "builderDependencies": {"type": "array", "items": RESOURCE}}},
                        "metadata": {"type": "object", "properties": {
                            "invocationId": {"type": "string"}, "startedOn": TIMESTAMP, "finishedOn": TIMESTAMP}},
                        "byproducts": {"type": "array", "items": RESOURCE},
                    },
                },
            },
        },
    },
}


def _deps(statement: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_statement_is_an_in_toto_v1_slsa_v1_document_signed_and_free_of_secrets(
        project: Project, keys: Keys) -> None:
    project.doit()
    project.cli("provenance", "digest:toy", "seeded:toy", "faketool:toy", "--closure", "--sign-key",
                str(keys.secret_file), "--quiet")
    envelopes = sorted(project.store.glob("*.provenance.json"))
    tasks = {project.store.joinpath(p.name.removesuffix(".provenance.json") + ".json") for p in envelopes}
    assert len(envelopes) == 9  # template tree tarball checksum combine digest + seed source, seeded, faketool
    for path in envelopes:
        assert FAKE_AWS_SECRET.encode() not in path.read_bytes()  # in the builds' environment, never written
        verified = dsse.verify(dsse.read(path), [keys.secret.public()])
        assert verified.ok, (path, verified.reason)
        assert verified.statement is not None
        jsonschema.validate(verified.statement, SCHEMA)
        for dep in verified.statement["predicate"]["buildDefinition"]["resolvedDependencies"]:
            kind = dep["annotations"]["kind"]
            assert "sha256" in dep["digest"] or kind == "git", dep  # sha256 always, beside blake3
    assert all(t.is_file() for t in tasks)

    combine = project.statement("combine:toy")
    meta = project.meta("combine:toy")
    entry = project.entry("combine:toy")
    (subject,) = combine["subject"]
    assert subject == {"name": "release.txt", "digest": {"sha256": _sha256(entry / "release.txt"),
                                                         "blake3": subject["digest"]["blake3"]}}
    definition = combine["predicate"]["buildDefinition"]
    assert definition["buildType"] == "eulerbake:buildtype/derivation/v1"
    assert definition["externalParameters"] == {"task": "combine:toy", "stage": "combine", "label": "toy",
                                                "params": {"title": "toy release"}}
    assert definition["internalParameters"]["manifest"] == meta["manifest"]
    assert hash_json(definition["internalParameters"]["manifest"])[:32] == meta["key"]
    deps = _deps(combine)
    assert deps["patch"]["digest"]["sha256"] == _sha256(project.root / "fix.patch")
    assert deps["patch"]["annotations"] == {"kind": "file", "input": "patch", "path": "fix.patch"}
    checksum = project.meta("checksum:toy")
    assert deps["checksum"]["uri"] == f"eulerbake:store/{checksum['key']}-checksum-toy"
    assert deps["checksum"]["digest"]["blake3"] == checksum["output"]["hash"]
    assert deps["checksum"]["annotations"]["provenanceSha256"] == dsse.sha256_of(
        Path(f"{project.entry('checksum:toy')}.provenance.json"))  # a hash chain of envelopes
    commit = project.git("rev-parse", "HEAD").strip()
    assert deps["recipes"]["digest"] == {"gitCommit": commit}
    assert deps["recipes"]["annotations"]["dirty"] is False
    assert deps["code:recipes.toy"]["annotations"]["path"] == "recipes/toy.py"
    run = combine["predicate"]["runDetails"]
    assert run["metadata"]["invocationId"] == meta["key"]
    assert run["builder"]["version"] == {"eulerbake": meta["built_by"]["engine"]}
    assert run["byproducts"][0]["digest"]["sha256"] == _sha256(Path(f"{entry}.log"))

    # The tools that really ran, with their versions; the pinned source with the URL it was pinned from.
    tooled = project.statement("faketool:toy")["predicate"]["runDetails"]["builder"]["builderDependencies"]
    assert tooled == [{"name": "faketool", "uri": "eulerbake:tool/faketool",
                       "annotations": {"version": "faketool 2.5"}}]
    seed = _deps(project.statement("seeded:toy"))["seed"]
    pins = (project.root / "seed.pins").read_text().split()
    assert seed["uri"] == (project.root / "seed.bin").as_uri()
    assert seed["digest"] == {"sha256": pins[0], "blake3": pins[1]}
    assert seed["annotations"]["kind"] == "fixed-output"
    fetch = project.statement("fetch:toy:seed")
    assert fetch["predicate"]["buildDefinition"]["buildType"] == "eulerbake:buildtype/fixed-output/v1"
    assert _deps(fetch)["seed.bin"]["uri"] == (project.root / "seed.bin").as_uri()


def test_one_byte_of_the_patch_changes_its_dependency_and_everything_downstream(project: Project, keys: Keys) -> None:
    sign = ("--closure", "--sign-key", str(keys.secret_file), "--quiet")
    project.doit()
    project.cli("provenance", "digest:toy", "independent:toy", *sign)
    before = {task: project.statement(task) for task in ("tarball:toy", "combine:toy", "digest:toy", "independent:toy")}

    patch = project.root / "fix.patch"
    data = bytearray(patch.read_bytes())
    data[3] ^= 0x01
    patch.write_bytes(bytes(data))
    project.doit()
    project.cli("provenance", "digest:toy", "independent:toy", *sign)
    after = {task: project.statement(task) for task in before}

    old, new = _deps(before["combine:toy"])["patch"], _deps(after["combine:toy"])["patch"]
    assert old["digest"]["sha256"] != new["digest"]["sha256"] and old["digest"]["blake3"] != new["digest"]["blake3"]
    assert new["digest"]["sha256"] == _sha256(patch)
    for task in ("combine:toy", "digest:toy"):  # downstream: a new key, new outputs, new inputs
        assert before[task]["subject"][0]["digest"] != after[task]["subject"][0]["digest"], task
        old_id = before[task]["predicate"]["runDetails"]["metadata"]["invocationId"]
        assert old_id != after[task]["predicate"]["runDetails"]["metadata"]["invocationId"]
    old_release, new_release = _deps(before["digest:toy"])["release"], _deps(after["digest:toy"])["release"]
    assert old_release["annotations"]["key"] != new_release["annotations"]["key"]
    assert old_release["digest"] != new_release["digest"]
    for task in ("tarball:toy", "independent:toy"):  # not downstream of the patch: the same statement …
        assert before[task]["subject"] == after[task]["subject"], task
        assert before[task]["predicate"]["runDetails"] == after[task]["predicate"]["runDetails"], task
        old_deps, new_deps = _deps(before[task]), _deps(after[task])
        assert {n: d for n, d in old_deps.items() if n != "recipes"} == \
            {n: d for n, d in new_deps.items() if n != "recipes"}, task
    # … but for the checkout: independent:toy was signed again, now that fix.patch has uncommitted changes.
    assert _deps(after["independent:toy"])["recipes"]["annotations"]["dirty"] is True
    assert _deps(after["tarball:toy"])["recipes"]["annotations"]["dirty"] is False  # kept, not re-signed


def test_the_listing_digest_is_go_dirhash_h1() -> None:
    files = {"b.txt": {"sha256": "11" * 32}, "a/x": {"sha256": "22" * 32}}
    raw = hashlib.sha256(f"{'22' * 32}  a/x\n{'11' * 32}  b.txt\n".encode()).digest()
    assert listing_digest(files) == {"sha256": raw.hex(), "dirHash": "h1:" + base64.b64encode(raw).decode()}


def test_no_secret_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    assert public_url("https://ci:glpat-s3cret@mirror.example/o/x.qcow2") == "https://mirror.example/o/x.qcow2"
    assert public_url("/srv/mirror/x.iso") == "file:///srv/mirror/x.iso"
    document = {"subject": [], "predicate": {"params": {"note": "token ghp_0123456789abcdef here"}}}
    check_no_secrets(document)  # nothing secret in the environment looks like it
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_0123456789abcdef")
    with pytest.raises(EulerbakeError, match="GITHUB_TOKEN") as caught:
        check_no_secrets(document)
    assert "ghp_0123456789abcdef" not in str(caught.value)  # the message names the variable, never the value
    with pytest.raises(EulerbakeError, match="aws_secret_access_key"):
        check_no_secrets({"x": 'a sec"ret-value-1'}, {"aws_secret_access_key": 'sec"ret-value-1'})
