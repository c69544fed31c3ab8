"""Publications through real doit/eulerbake runs against the toy HTTP service (tests/engine/toyservice.py).

The toy project's `publish:toy` publishes `combine:toy` to the service, tagged with its key; the service
records every request, so each test asserts exactly which remote calls a run made.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine.conftest import ToyProject
from tests.engine.toyservice import ToyService

TOKEN = "toy-token-7f3a9c1e5b"  # distinctive: searched for in every file of the store


@pytest.fixture
def service() -> Iterator[ToyService]:
    started = ToyService(TOKEN).start()
    yield started
    started.stop()


def _env(service: ToyService, token: str = TOKEN, **extra: str) -> dict[str, str]:
    return {"TOY_SERVICE_URL": service.url, "TOY_SERVICE_TOKEN": token, **extra}


def _publish_entries(toy: ToyProject) -> list[dict[str, Any]]:
    """Metadata of every committed publish:toy entry."""
    entries = [json.loads(meta.read_text()) for meta in toy.store.glob("*-publish-toy.json")]
    return [meta for meta in entries if (toy.store / f"{meta['key']}-publish-toy").is_dir()]


def _receipt(toy: ToyProject) -> dict[str, Any]:
    (meta,) = _publish_entries(toy)
    receipt: dict[str, Any] = json.loads((toy.store / f"{meta['key']}-publish-toy" / "receipt.json").read_text())
    return receipt


def _flat(text: str) -> str:
    """`text` with runs of whitespace as one space (`eulerbake`'s error console folds long lines)."""
    return " ".join(text.split())


def _leftovers(toy: ToyProject) -> list[Path]:
    """Anything of publish:toy in the store proper (entry directory, metadata, log)."""
    return sorted(toy.store.glob("*-publish-toy*"))


def test_publishes_once_then_is_up_to_date_after_one_question(toy: ToyProject, service: ToyService) -> None:
    first = toy.doit("publish:toy", environ=_env(service))
    assert "6 built, 0 cached" in first.stdout
    assert toy.ran()[-1] == "publish"
    (meta,) = _publish_entries(toy)
    key = meta["key"]
    assert service.count("POST") == 1
    (resource,) = service.resources.values()
    assert resource["tag"] == key and resource["name"] == "toy-release"
    (release,) = toy.store.glob("*-combine-toy")  # what was published is the input's content
    assert resource["digest"] == hashlib.sha256((release / "release.txt").read_bytes()).hexdigest()
    receipt = _receipt(toy)
    assert receipt["resource"] == {"id": resource["id"], "endpoint": service.url}
    assert receipt["key"] == key and receipt["task"] == "publish:toy"

    service.reset_counts()
    second = toy.doit("publish:toy", environ=_env(service))
    assert "0 built, 6 cached" in second.stdout
    assert toy.ran() == []
    assert service.requests == [("GET", f"/resources/{resource['id']}")]  # asked once, created nothing
    assert len(service.resources) == 1


def test_resource_deleted_behind_our_back_is_published_again(toy: ToyProject, service: ToyService) -> None:
    toy.doit("publish:toy", environ=_env(service))
    (old,) = service.resources.values()
    service.forget(old["id"])
    service.reset_counts()

    again = toy.doit("publish:toy", environ=_env(service))
    assert "1 built, 5 cached" in again.stdout
    assert "no longer has the published resource" in again.stderr
    # asked once whether it is there, then searched by tag (nothing to adopt), then created it again
    assert service.requests == [("GET", f"/resources/{old['id']}"), ("GET", "/resources"), ("POST", "/resources")]
    (new,) = service.resources.values()
    assert new["id"] != old["id"] and new["tag"] == old["tag"]  # same key, a new resource
    assert _receipt(toy)["resource"]["id"] == new["id"]
    assert len(_publish_entries(toy)) == 1


def test_offline_trusts_the_receipt_without_asking(toy: ToyProject, service: ToyService) -> None:
    toy.doit("publish:toy", environ=_env(service))
    (resource,) = service.resources.values()
    service.forget(resource["id"])  # only a question would notice: offline runs must not ask
    service.reset_counts()

    offline = toy.doit("publish:toy", environ=_env(service, EULERBAKE_OFFLINE="1"))
    assert "0 built, 6 cached" in offline.stdout
    via_cli = toy.eulerbake("--offline", "publish:toy", environ=_env(service))
    assert "0 built, 6 cached" in via_cli.stdout
    assert service.requests == []

    online = toy.doit("publish:toy", environ=_env(service, EULERBAKE_OFFLINE="0"))  # "0" is not offline
    assert "1 built, 5 cached" in online.stdout
    assert service.count("POST") == 1


def test_clean_forgets_the_receipt_and_the_next_run_adopts_the_resource(toy: ToyProject, service: ToyService) -> None:
    toy.doit("publish:toy", environ=_env(service))
    (resource,) = service.resources.values()
    receipt = _receipt(toy)

    toy.doit("clean", "publish:toy", environ=_env(service))
    assert _leftovers(toy) == []
    assert service.count("DELETE") == 0 and list(service.resources) == [resource["id"]]  # remote things stay
    assert list(toy.store.glob("*-combine-toy"))  # and other entries too

    service.reset_counts()
    adopted = toy.doit("publish:toy", environ=_env(service))
    assert "adopting the resource already tagged with key" in adopted.stderr
    assert service.count("POST") == 0
    assert service.count("GET", "/resources") == 1  # the search by tag, nothing else
    assert list(service.resources) == [resource["id"]]
    assert _receipt(toy) == receipt


def test_unpublish_deletes_the_resource_and_the_receipt(toy: ToyProject, service: ToyService) -> None:
    toy.doit("publish:toy", environ=_env(service))
    (resource,) = service.resources.values()
    service.reset_counts()

    done = toy.eulerbake("unpublish", "publish:toy", environ=_env(service))
    assert "publish:toy: remote resource removed, receipt forgotten" in done.stdout
    assert service.requests == [("DELETE", f"/resources/{resource['id']}")]
    assert service.resources == {}
    assert _leftovers(toy) == []

    service.reset_counts()
    nothing = toy.eulerbake("unpublish", "publish:toy", environ=_env(service))
    assert "no receipt in the store, nothing to unpublish" in nothing.stdout
    assert service.requests == []

    refused = toy.eulerbake("unpublish", "combine:toy", check=False, environ=_env(service))
    assert refused.returncode == 2
    assert "error: combine:toy is a derivation, not a publication" in _flat(refused.stderr)
    assert "fix: unpublish names publication tasks" in _flat(refused.stderr)
    assert "Traceback" not in refused.stderr
    assert list(toy.store.glob("*-combine-toy"))  # refused: nothing was touched


def test_unpublish_checks_every_name_before_removing_anything(toy: ToyProject, service: ToyService) -> None:
    toy.doit("publish:toy", environ=_env(service))
    service.reset_counts()
    refused = toy.eulerbake("unpublish", "publish:toy", "combine:toy", check=False, environ=_env(service))
    assert refused.returncode == 2 and "combine:toy is a derivation" in refused.stderr
    assert service.requests == [] and len(service.resources) == 1
    assert len(_publish_entries(toy)) == 1


def test_unpublish_names_receipts_of_earlier_keys(toy: ToyProject, service: ToyService) -> None:
    toy.doit("publish:toy", environ=_env(service))
    (earlier,) = _publish_entries(toy)
    service.reset_counts()
    renamed = _env(service, TOY_RESOURCE="renamed-release")  # another target: another key, nothing published
    proc = toy.eulerbake("unpublish", "publish:toy", environ=renamed)
    message = _flat(proc.stdout)
    assert "publish:toy: no receipt for its current key, nothing unpublished" in message
    assert f"1 receipt(s) of earlier keys, left alone: {earlier['key']}-publish-toy" in message
    assert service.requests == [] and len(service.resources) == 1


def test_unpublish_refuses_offline_mode(toy: ToyProject, service: ToyService) -> None:
    toy.doit("publish:toy", environ=_env(service))
    service.reset_counts()
    refused = toy.eulerbake("--offline", "unpublish", "publish:toy", check=False, environ=_env(service))
    assert refused.returncode == 2
    assert "error: unpublish removes remote resources, which offline mode never contacts" in _flat(refused.stderr)
    assert "fix: run it without --offline" in _flat(refused.stderr)
    assert service.requests == [] and len(service.resources) == 1
    assert len(_publish_entries(toy)) == 1  # the receipt is kept


def _files_holding(root: Path, secret: str) -> list[Path]:
    """Every file under `root` whose bytes contain `secret` (raw or JSON-escaped)."""
    needles = {secret.encode(), json.dumps(secret)[1:-1].encode()}
    return [path for path in sorted(root.rglob("*"))
            if path.is_file() and any(needle in path.read_bytes() for needle in needles)]


def test_the_token_is_never_written_or_printed(toy: ToyProject, service: ToyService) -> None:
    env = _env(service)
    runs = [toy.doit("publish:toy", environ=env), toy.doit("publish:toy", environ=env),
            toy.doit("clean", "publish:toy", environ=env), toy.doit("publish:toy", environ=env),
            toy.doit("info", "publish:toy", check=False, environ=env),
            toy.eulerbake("store", "info", "publish:toy", environ=env),
            toy.eulerbake("store", "log", "publish:toy", environ=env)]
    assert service.rejected == 0 and service.count("POST") == 1  # the token was used, and accepted
    written = [p.name for p in toy.store.rglob("*") if p.is_file()]
    assert any(name.endswith("-publish-toy.log") for name in written) and "receipt.json" in written
    assert any(name.endswith("-publish-toy.json") for name in written) and ".doit.sqlite3" in written
    assert _files_holding(toy.store, TOKEN) == []
    for proc in runs:
        assert TOKEN not in proc.stdout + proc.stderr, proc.args


@pytest.mark.parametrize("token", ["plain-leaky-token-42", 'leaky"token\\with/escapes'],
                         ids=["plain", "json-escaped"])
def test_a_receipt_holding_the_token_is_refused(toy: ToyProject, token: str) -> None:
    service = ToyService(token).start()
    try:
        env = _env(service, token)
        leak = toy.doit("publish:toy", check=False, environ=env, TOY_LEAK_SECRET="1")
        output = leak.stdout + leak.stderr
        assert leak.returncode != 0
        assert "the receipt of publish:toy contains the secret TOY_SERVICE_TOKEN; nothing was committed" in output
        assert token not in output
        assert _leftovers(toy) == [] and list((toy.store / ".tmp").iterdir()) == []
        (failed,) = (toy.store / ".failed").glob("*-publish-toy.log")
        assert "contains the secret TOY_SERVICE_TOKEN" in failed.read_text()  # the log says why
        assert _files_holding(toy.store, token) == []

        # The refused run did create the resource: a fixed publisher adopts it instead of making another.
        assert service.count("POST") == 1
        fixed = toy.doit("publish:toy", environ=env)
        assert "adopting" in fixed.stderr and service.count("POST") == 1
        assert "auth" not in _receipt(toy)["resource"]
    finally:
        service.stop()


def test_a_token_in_a_log_message_or_an_exception_is_masked(toy: ToyProject, service: ToyService) -> None:
    failed = toy.doit("publish:toy", check=False, environ=_env(service, TOY_LEAK_SECRET="error"))
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "publish:toy: publishing at " in output and "the service did not like the credential ***" in output
    assert "Traceback" not in output
    assert (toy.store / ".failed").is_dir() and list((toy.store / ".failed").glob("*-publish-toy.log"))
    assert _leftovers(toy) == [] and service.count("POST") == 0

    logged = toy.doit("publish:toy", environ=_env(service, TOY_LEAK_SECRET="log"))
    assert f"authenticating to {service.url} with ***" in logged.stderr
    (log,) = toy.store.glob("*-publish-toy.log")
    assert f"# authenticating to {service.url} with ***" in log.read_text()
    for proc in (failed, logged):
        assert TOKEN not in proc.stdout + proc.stderr
    assert _files_holding(toy.store, TOKEN) == []  # the failed log of the first run included


def test_an_unreachable_target_is_one_message_and_offline_still_works(toy: ToyProject, service: ToyService) -> None:
    toy.doit("publish:toy", environ=_env(service))
    env = _env(service)
    service.stop()  # the endpoint now refuses connections

    down = toy.doit("publish:toy", check=False, environ=env)
    output = down.stdout + down.stderr
    assert down.returncode != 0 and "Traceback" not in output
    assert f"publish:toy: asking whether the published resource still exists at {service.url} failed" in output
    assert "Connection refused" in output and "eulerbake --offline" in output
    assert len(_publish_entries(toy)) == 1  # the receipt is not dropped because the target could not answer

    assert "0 built, 6 cached" in toy.eulerbake("--offline", "publish:toy", environ=env).stdout
    refused = toy.eulerbake("unpublish", "publish:toy", check=False, environ=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"error: publish:toy: removing the published resource at {service.url} failed" in _flat(refused.stderr)
    assert "the receipt was kept" in _flat(refused.stderr)
    assert len(_publish_entries(toy)) == 1


def test_missing_or_broken_credentials_are_one_message(toy: ToyProject, service: ToyService) -> None:
    no_token = {"TOY_SERVICE_URL": service.url}
    first = toy.doit("publish:toy", check=False, environ=no_token)
    assert first.returncode != 0 and "Traceback" not in first.stdout + first.stderr
    assert f"no token for the toy service at {service.url}" in first.stdout + first.stderr
    assert "fix: set TOY_SERVICE_TOKEN" in first.stdout + first.stderr
    assert _leftovers(toy) == [] and service.requests == []

    toy.doit("publish:toy", environ=_env(service))
    service.reset_counts()
    broken = toy.doit("publish:toy", check=False, environ=_env(service, TOY_CREDENTIALS_BROKEN="1"))
    output = broken.stdout + broken.stderr
    assert broken.returncode != 0 and "Traceback" not in output
    assert (f"publish:toy: finding the credentials at {service.url} failed: "
            "LookupError: the credential chain found no usable profile") in output
    assert service.requests == [] and len(_publish_entries(toy)) == 1  # nothing asked, the receipt kept


def test_target_changes_the_key_and_the_token_does_not(toy: ToyProject, service: ToyService) -> None:
    toy.doit("publish:toy", environ=_env(service))
    (first,) = _publish_entries(toy)
    assert TOKEN not in json.dumps(first["manifest"])

    rotated = "rotated-token-0c41"
    service.tokens.add(rotated)
    service.reset_counts()
    same = toy.doit("publish:toy", environ=_env(service, rotated))
    assert "0 built, 6 cached" in same.stdout  # same key: only asked whether the resource is still there
    assert service.requests == [("GET", f"/resources/{_receipt(toy)['resource']['id']}")]

    toy.doit("publish:toy", environ=_env(service, TOY_RESOURCE="renamed-release"))
    localhost = service.url.replace("127.0.0.1", "localhost")  # the same service under another endpoint
    toy.doit("publish:toy", environ=_env(service) | {"TOY_SERVICE_URL": localhost})
    entries = _publish_entries(toy)
    assert len({meta["key"] for meta in entries}) == 3
    assert sorted(meta["manifest"]["target"]["resource"] for meta in entries) == \
        ["renamed-release", "toy-release", "toy-release"]
    assert sorted(r["name"] for r in service.resources.values()) == ["renamed-release", "toy-release", "toy-release"]
    assert {r["tag"] for r in service.resources.values()} == {meta["key"] for meta in entries}


def test_service_runs_as_a_process(tmp_path: Path) -> None:
    """`python -m tests.engine.toyservice` serves the same API (for trying a publisher by hand)."""
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "tests.engine.toyservice", "--port-file", str(port_file),
                             "--token", TOKEN], cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        assert url in line
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        body = json.dumps({"name": "n", "tag": "t", "digest": "d"}).encode()
        request = urllib.request.Request(f"{url}/resources", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with opener.open(request, timeout=5) as response:
            assert response.status == 201
        with pytest.raises(urllib.error.HTTPError) as denied:
            opener.open(urllib.request.Request(f"{url}/resources?tag=t"), timeout=5)
        assert denied.value.code == 401
        with opener.open(f"{url}/_stats", timeout=5) as response:
            stats = json.loads(response.read())
        assert stats["requests"] == [["POST", "/resources"], ["GET", "/resources"]]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
