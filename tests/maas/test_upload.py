"""`maas-upload` against a MAAS stand-in (tests/maas/maas_standin.py: no real MAAS can run here).

The stand-in enforces what MAAS enforces (OAuth PLAINTEXT, the create form's fields, the chunk rules, the
sha256 at completion); these tests drive the publisher through the engine's store, as doit would, and
check the remote state the stand-in ends with: one complete resource, listed, with the tarball's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from eulerbake.core.derivation import LocalTree
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store
from recipes.publish.maas import CHUNK_SIZE, MaasClient, load_credentials, maas_upload, multipart, release_name
from tests.maas.maas_standin import MaasStandin

API_KEY = "Ck7f3a9c1e5bQ2:Tk5b2d8e0f4aW9:Ts9c1e7a3b5dZ4xY8"  # distinctive: searched for in the whole store
PARTS = API_KEY.split(":")
SIZE = 2 * CHUNK_SIZE + 12345  # three chunks, the last one short


@pytest.fixture
def standin() -> Iterator[MaasStandin]:
    server = MaasStandin(API_KEY).start()
    yield server
    server.stop()


@pytest.fixture
def tarball(tmp_path: Path) -> Path:
    """A maas-tgz output stand-in: root.tgz of incompressible bytes (the upload does not look inside)."""
    folder = tmp_path / "tgz"
    folder.mkdir()
    block, data = b"seed", bytearray()
    while len(data) < SIZE:
        block = hashlib.sha512(block).digest()
        data += block
    (folder / "root.tgz").write_bytes(bytes(data[:SIZE]))
    return folder


@pytest.fixture
def maas_env(standin: MaasStandin, monkeypatch: pytest.MonkeyPatch) -> MaasStandin:
    monkeypatch.setenv("EULERBAKE_MAAS_URL", standin.url)
    monkeypatch.setenv("EULERBAKE_MAAS_API_KEY", API_KEY)
    monkeypatch.setenv("EULERBAKE_MAAS_RETRY_DELAY", "0")
    return standin


def _publication(tarball: Path, name: str = "rhel/8.9"):  # type: ignore[no-untyped-def]
    return maas_upload("22.03-LTS-SP4:x86_64", LocalTree(tarball), name=name, title="openEuler 22.03 LTS SP4",
                       arch="x86_64")


def _publish(tarball: Path, store: Path) -> dict[str, object]:
    entry = Store(store).realise(_publication(tarball), log=lambda _m: None).path
    return dict(json.loads((entry / "receipt.json").read_text())["resource"])


def _remote_bytes(standin: MaasStandin, resource_id: int) -> list[tuple[bool, bytes]]:
    resource = standin.resources[resource_id]
    return [(f.complete, bytes(f.content)) for files in resource.sets.values() for f in files.values()]


def _assert_complete(standin: MaasStandin, tarball: Path, receipt: dict[str, object]) -> None:
    data = (tarball / "root.tgz").read_bytes()
    resource = standin.resources[int(str(receipt["id"]))]
    stored = next(iter(resource.sets[str(receipt["set"])].values()))
    assert stored.complete and bytes(stored.content) == data
    assert receipt["sha256"] == hashlib.sha256(data).hexdigest() == stored.sha256


def test_create_then_chunked_upload(maas_env: MaasStandin, tarball: Path, tmp_path: Path) -> None:
    receipt = _publish(tarball, tmp_path / "store")
    _assert_complete(maas_env, tarball, receipt)
    assert maas_env.put_bodies == [CHUNK_SIZE, CHUNK_SIZE, 12345]
    assert maas_env.count("POST") == 1
    assert receipt["name"] == "rhel/8.9" and receipt["architecture"] == "amd64/generic"
    assert receipt["endpoint"] == maas_env.url and receipt["filetype"] == "tgz"
    client = MaasClient(maas_env.url, load_credentials("default").secrets())
    listed = client.get(client.api("boot-resources/?type=uploaded"))
    assert [(r["id"], r["name"], r["architecture"]) for r in listed] == [(receipt["id"], "rhel/8.9", "amd64/generic")]
    detail = client.get(client.api(f"boot-resources/{receipt['id']}/"))
    assert detail["title"] == "openEuler 22.03 LTS SP4"
    (file_entry,) = detail["sets"][receipt["set"]]["files"].values()
    assert file_entry["complete"] and "upload_uri" not in file_entry


def test_the_api_key_never_reaches_the_store(maas_env: MaasStandin, tarball: Path, tmp_path: Path) -> None:
    _publish(tarball, tmp_path / "store")
    # and a failed run leaves a log: nothing of the key in it either
    maas_env.token_secret = "rotated"
    with pytest.raises(EulerbakeError):
        Store(tmp_path / "store2").realise(_publication(tarball), log=lambda _m: None)
    for store in (tmp_path / "store", tmp_path / "store2"):
        for path in store.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(part.encode() in data for part in PARTS), f"{path} holds part of the API key"


def test_wrong_key_is_one_clear_error(maas_env: MaasStandin, tarball: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EULERBAKE_MAAS_API_KEY", "Ck7f3a9c1e5bQ2:Tk5b2d8e0f4aW9:wrong-secret")
    with pytest.raises(EulerbakeError) as failure:
        Store(tmp_path / "store").realise(_publication(tarball), log=lambda _m: None)
    message = str(failure.value)
    assert "refused the API key (HTTP 401" in message and "EULERBAKE_MAAS_API_KEY" in message
    assert "wrong-secret" not in message and "Tk5b2d8e0f4aW9" not in message  # the key's parts are masked
    assert "Traceback" not in message
    assert maas_env.resources == {} and not list((tmp_path / "store").glob("*-maas-upload-*"))


def test_an_existing_resource_with_the_same_sha256_is_adopted(maas_env: MaasStandin, tarball: Path,
                                                             tmp_path: Path) -> None:
    first = _publish(tarball, tmp_path / "store-a")
    posts, puts = maas_env.count("POST"), maas_env.count("PUT")
    second = _publish(tarball, tmp_path / "store-b")  # another checkout: no receipt, same MAAS
    assert second == first
    assert (maas_env.count("POST"), maas_env.count("PUT")) == (posts, puts)


def test_exists_and_remove(maas_env: MaasStandin, tarball: Path, tmp_path: Path) -> None:
    publication = _publication(tarball)
    entry = Store(tmp_path / "store").realise(publication, log=lambda _m: None).path
    assert publication.confirm(entry)
    publication.unpublish(entry)
    assert maas_env.resources == {} and maas_env.count("DELETE") == 1
    assert not publication.confirm(entry)


@pytest.mark.parametrize("fault", ["drop-mid-body", "drop-after-store", "error-503"])
def test_a_failed_chunk_is_retried_and_the_upload_completes(maas_env: MaasStandin, tarball: Path, tmp_path: Path,
                                                            fault: str) -> None:
    maas_env.inject("pass", fault)  # the first chunk goes through, the second fails
    receipt = _publish(tarball, tmp_path / "store")
    _assert_complete(maas_env, tarball, receipt)
    # every byte arrived exactly once: the chunk that landed behind a lost answer was not sent again
    assert sum(maas_env.put_bodies) == SIZE
    assert maas_env.count("POST") == 1


def test_an_interrupted_run_is_resumed_by_the_next_one(maas_env: MaasStandin, tarball: Path, tmp_path: Path) -> None:
    maas_env.inject("pass", *["drop-mid-body"] * 6)  # the second chunk fails more often than it is retried
    with pytest.raises(EulerbakeError, match="failed 6 times"):
        Store(tmp_path / "store").realise(_publication(tarball), log=lambda _m: None)
    (resource,) = maas_env.resources.values()
    assert _remote_bytes(maas_env, resource.id) == [(False, (tarball / "root.tgz").read_bytes()[:CHUNK_SIZE])]
    assert not list((tmp_path / "store").glob("*-maas-upload-*"))  # no receipt for a partial upload
    receipt = _publish(tarball, tmp_path / "store")  # the next run goes on where MAAS stands
    _assert_complete(maas_env, tarball, receipt)
    assert maas_env.count("POST") == 1 and sum(maas_env.put_bodies) == SIZE


def test_a_copy_that_fails_its_sha256_restarts_on_a_fresh_set(maas_env: MaasStandin, tarball: Path,
                                                             tmp_path: Path) -> None:
    original = maas_env.upload
    corrupted = {"done": False}

    def corrupting(resource_id: int, file_id: int, length: int | None, body: bytes) -> tuple[int, object]:
        if not corrupted["done"]:  # one flipped bit on the way, the kind of damage only the sha256 sees
            corrupted["done"] = True
            body = bytes([body[0] ^ 1]) + body[1:]
        return original(resource_id, file_id, length, body)

    maas_env.upload = corrupting  # type: ignore[method-assign]
    receipt = _publish(tarball, tmp_path / "store")
    _assert_complete(maas_env, tarball, receipt)
    (resource,) = maas_env.resources.values()
    assert [complete for complete, _ in _remote_bytes(maas_env, resource.id)] == [False, True]  # restarted cleanly
    assert maas_env.count("POST") == 2


# -- the stand-in's rules, met by a signed client --------------------------------------------------------


def _client(standin: MaasStandin) -> MaasClient:
    return MaasClient(standin.url, {"consumer_key": PARTS[0], "token_key": PARTS[1], "token_secret": PARTS[2]})


def test_standin_checks_the_create_form(standin: MaasStandin) -> None:
    client = _client(standin)
    body, content_type = multipart({"name": "rhel/8", "architecture": "amd64/generic", "filetype": "tgz"})
    with pytest.raises(EulerbakeError) as failure:
        client.json("POST", client.api("boot-resources/"), body, content_type)
    assert '"sha256": ["This field is required."]' in str(failure.value)
    assert '"size": ["This field is required."]' in str(failure.value)
    body, content_type = multipart({"name": "custom/oe", "architecture": "amd64/generic", "sha256": "a" * 64,
                                    "size": "10"})
    with pytest.raises(EulerbakeError, match="base image is required"):
        client.json("POST", client.api("boot-resources/"), body, content_type)


def test_standin_enforces_the_chunk_rules(standin: MaasStandin) -> None:
    client = _client(standin)
    data = b"x" * 10
    body, content_type = multipart({"name": "rhel/8", "title": "t", "architecture": "amd64/generic",
                                    "filetype": "tgz", "sha256": hashlib.sha256(data).hexdigest(), "size": "10"})
    resource = client.json("POST", client.api("boot-resources/"), body, content_type)
    (version,) = resource["sets"]
    uri = resource["sets"][version]["files"]["root-tgz"]["upload_uri"]
    with pytest.raises(EulerbakeError, match="Too much data received."):
        client.request("PUT", uri, data + b"y", "application/octet-stream")
    assert client.request("PUT", uri, data[:4], "application/octet-stream")[0] == 200
    detail = client.get(client.api(f"boot-resources/{resource['id']}/"))
    assert detail["sets"][version]["files"]["root-tgz"]["progress"] == pytest.approx(40.0)
    assert client.request("PUT", uri, data[4:], "application/octet-stream")[0] == 200
    with pytest.raises(EulerbakeError, match="Cannot upload to a complete file."):
        client.request("PUT", uri, b"z", "application/octet-stream")


def test_standin_checks_the_sha256_at_completion(standin: MaasStandin) -> None:
    client = _client(standin)
    body, content_type = multipart({"name": "rhel/8", "architecture": "amd64/generic", "filetype": "tgz",
                                    "sha256": "0" * 64, "size": "3"})
    resource = client.json("POST", client.api("boot-resources/"), body, content_type)
    (entry,) = next(iter(resource["sets"].values()))["files"].values()
    with pytest.raises(EulerbakeError, match="Saved content does not match given SHA256 value."):
        client.request("PUT", entry["upload_uri"], b"abc", "application/octet-stream")


def test_standin_refuses_a_bad_signature(standin: MaasStandin) -> None:
    client = MaasClient(standin.url, {"consumer_key": PARTS[0], "token_key": PARTS[1], "token_secret": "nope"})
    with pytest.raises(EulerbakeError, match="HTTP 401"):
        client.get(client.api("boot-resources/"))


# -- credentials ------------------------------------------------------------------------------------------


def test_profile_file(standin: MaasStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EULERBAKE_MAAS_URL", "EULERBAKE_MAAS_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    profiles = tmp_path / "maas.toml"
    profiles.write_text(f'[lab]\nurl = "{standin.url}/"\napi_key = "{API_KEY}"\n')
    monkeypatch.setenv("EULERBAKE_MAAS_PROFILES", str(profiles))
    os.chmod(profiles, 0o644)
    with pytest.raises(EulerbakeError, match="others can read it"):
        load_credentials("lab")
    os.chmod(profiles, 0o600)
    credentials = load_credentials("lab")
    assert credentials.url == standin.url and credentials.token_secret == PARTS[2]
    with pytest.raises(EulerbakeError, match=r"no MAAS profile \[other\]"):
        load_credentials("other")


def test_names_from_the_release_table() -> None:
    from recipes.releases import RELEASES

    names = [release_name(version) for version in RELEASES]
    assert len(set(names)) == len(names)  # one boot resource per release
    assert release_name("22.03-LTS") == "rhel/8" and release_name("20.03-LTS-SP1") == "rhel/8.2"  # the seed's
    with pytest.raises(EulerbakeError, match="needs a base_image"):
        maas_upload("x", LocalTree(Path("/nonexistent")), name="custom/openeuler", title="t", arch="x86_64")
