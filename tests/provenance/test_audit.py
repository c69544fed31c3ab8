"""`eulerbake audit` of tasks, store paths and files in the toy project, through real processes."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

from eulerbake.store.signing import SecretKey
from tests.provenance.conftest import Keys, Project


def _signed(project: Project, keys: Keys, *tasks: str) -> None:
    project.doit()
    project.cli("provenance", *tasks, "--closure", "--sign-key", str(keys.secret_file), "--quiet")


def _audit(project: Project, *args: str, key: str | Path | None = None) -> tuple[int, dict[str, Any]]:
    trust = ("--trusted-key", str(key)) if key is not None else ()
    proc = project.cli("audit", *args, *trust, "--json", check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _nodes(tree: dict[str, Any]) -> list[dict[str, Any]]:
    return [tree, *(node for child in tree["children"] for node in _nodes(child))]


def test_audit_of_a_task_walks_back_to_its_sources_and_a_later_edit_is_drift(project: Project, keys: Keys) -> None:
    _signed(project, keys, "digest:toy")
    status, result = _audit(project, "digest:toy", key=keys.public_file)
    assert status == 0 and result["ok"] and result["problems"] == []
    nodes = _nodes(result["tree"])
    entries = {n["label"] for n in nodes if n["kind"] == "entry"}
    assert entries == {"digest:toy", "combine:toy", "checksum:toy", "tarball:toy", "template:toy", "tree:toy"}
    locals_ = {n["info"]["found"] for n in nodes if n["kind"] in ("file", "tree")}
    assert locals_ == {str(project.root / p) for p in ("fix.patch", "templates/motd.j2", "overlay")}
    assert any(n["kind"] == "git" and n["status"] == "pass" for n in nodes)
    assert all(n["status"] == "pass" for n in nodes)

    # The human view: a tree down to the sources, and the verdict.
    text = project.cli("audit", "digest:toy", "--trusted-key", keys.public).stdout
    assert "digest:toy" in text and "templates/motd.j2" in text and "audit passed" in text

    # The template edited after the build: the old entry (by its store path) now shows drift, and fails.
    old_entry = project.entry("digest:toy")
    template = project.root / "templates" / "motd.j2"
    template.write_text(template.read_text() + "edited\n")
    status, result = _audit(project, str(old_entry), key=keys.public_file)
    assert status == 1 and not result["ok"]
    (problem,) = result["problems"]
    assert "templates/motd.j2" in problem and "edited after the build" in problem
    drifted = [n for n in _nodes(result["tree"]) if n["status"] == "drift" and n["kind"] == "file"]
    assert [n["info"]["found"] for n in drifted] == [str(template)]
    proc = project.cli("audit", str(old_entry), "--trusted-key", keys.public, check=False)
    assert proc.returncode == 1 and "audit FAILED" in proc.stdout and "was edited after the build" in proc.stdout
    status, result = _audit(project, str(old_entry), "--allow-drift", key=keys.public_file)
    assert status == 0 and result["ok"]


def test_untrusted_keys_and_tampered_envelopes_fail_the_audit(project: Project, keys: Keys) -> None:
    _signed(project, keys, "combine:toy")
    status, result = _audit(project, "combine:toy", key=str(SecretKey.generate("someone-else").public()))
    assert status == 1
    assert any("signed only by keys not trusted here (ci-test-1)" in p for p in result["problems"])
    status, result = _audit(project, "combine:toy")  # nothing trusted at all
    assert status == 1 and any("no public key is trusted here" in p for p in result["problems"])

    # Change what an upstream envelope says (the tarball's output digest): its signature no longer matches.
    envelope_path = Path(f"{project.entry('tarball:toy')}.provenance.json")
    envelope = json.loads(envelope_path.read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["subject"][0]["digest"]["sha256"] = "0" * 64
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    envelope_path.write_text(json.dumps(envelope))
    status, result = _audit(project, "combine:toy", key=keys.public_file)
    assert status == 1
    problems = "\n".join(result["problems"])
    assert "tarball:toy: signature: the provenance does not verify" in problems
    assert "tarball:toy: subjects: bundle.tar hashes to sha256" in problems


def test_audit_of_a_file(project: Project, keys: Keys, tmp_path: Path) -> None:
    _signed(project, keys, "combine:toy")
    stranger = tmp_path / "downloaded.txt"
    stranger.write_text("not from any build\n")
    proc = project.cli("audit", str(stranger), "--trusted-key", keys.public, check=False)
    assert proc.returncode == 1
    assert f"{stranger} was not made by eulerbake" in proc.stdout and "matches no output in the store" in proc.stdout

    copied = tmp_path / "release-copy.txt"  # an output copied out of the store is found by its content
    shutil.copy(project.entry("combine:toy") / "release.txt", copied)
    status, result = _audit(project, str(copied), key=keys.public_file)
    assert status == 0
    (made,) = result["tree"]["children"]
    assert made["label"] == "combine:toy" and made["checks"][0]["detail"].startswith("the file is release.txt of ")

    bad = project.cli("audit", "no-such-thing", "--trusted-key", keys.public, check=False)
    assert bad.returncode == 2 and "no store entry matches 'no-such-thing'" in bad.stderr
