"""The store's verify, has and provenance commit, in-process (where mutation testing found gaps): each problem
`store verify` can report has one exact message, `has` checks an entry once per process and never moves an
entry aside for a missing directory, and a build's signed provenance is committed beside its entry (a
substituted entry's is not made here)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from eulerbake.core import hashing
from eulerbake.core.derivation import BuildContext, Derivation
from eulerbake.provenance import SIGNING_KEY_ENV, dsse
from eulerbake.store.local import Store
from eulerbake.store.signing import SecretKey


def write_files(ctx: BuildContext) -> None:
    for index in range(int(ctx.params.get("files", 1))):
        (ctx.out / f"f{index}.txt").write_text(f"{ctx.params['text']} {index}\n")


def copy_up(ctx: BuildContext) -> None:
    shutil.copyfile(ctx.inputs["up"] / "f0.txt", ctx.out / "copy.txt")


def quiet(_message: str) -> None:
    pass


def _entry(store: Store, text: str, files: int = 1) -> tuple[Derivation, dict[str, Any]]:
    drv = Derivation("verify", text, write_files, params={"text": text, "files": files})
    store.realise(drv, log=quiet)
    return drv, store.read_meta(store.meta_path(drv))


def _writable(path: Path) -> None:
    for part in [path, *path.rglob("*")]:
        os.chmod(part, 0o755 if part.is_dir() else 0o644)


def test_each_problem_of_verify_has_its_exact_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")
    _, no_seal = _entry(store, "no-seal")
    _, many = _entry(store, "many", files=2)
    _, wrong_hash = _entry(store, "wrong-hash")
    _, wrong_manifest = _entry(store, "wrong-manifest")
    _, fine = _entry(store, "fine")
    assert store.verify() == []

    store.seal_path(no_seal["key"]).unlink()  # the output itself is intact
    _writable(Path(many["path"]))
    for index in range(5):  # five problems: the message shows the first three
        (Path(many["path"]) / f"extra-{index}").write_text("x")
    meta_file = Path(wrong_hash["path"] + ".json")
    recorded = dict(wrong_hash, output={**wrong_hash["output"], "hash": "f" * 64})
    meta_file.write_text(json.dumps({k: v for k, v in recorded.items() if k != "path"}))
    manifest_file = Path(wrong_manifest["path"] + ".json")
    edited = json.loads(manifest_file.read_text())
    edited["manifest"]["params"]["text"] = "edited"
    manifest_file.write_text(json.dumps(edited))

    problems = {Path(meta["path"]).name: problem for meta, problem in store.verify()}
    names = {meta["key"]: Path(meta["path"]).name for meta in (no_seal, many, wrong_hash, wrong_manifest, fine)}
    assert set(problems) == {names[no_seal["key"]], names[many["key"]], names[wrong_hash["key"]],
                             names[wrong_manifest["key"]]}
    assert problems[names[no_seal["key"]]] == "its seal record is missing"
    sealed = store.seal_problems(many["key"], Path(many["path"]))
    assert len(sealed) == 5 and problems[names[many["key"]]] == "; ".join(sealed[:3])
    actual = hashing.hash_tree(Path(wrong_hash["path"]), use_cache=False)
    assert problems[names[wrong_hash["key"]]] == \
        f"content hash {actual[:16]}… does not match recorded {'f' * 16}…"
    assert problems[names[wrong_manifest["key"]]] == "metadata manifest does not hash to the entry's key"

    # Only the entries it is given; and an unreadable one does not stop the others.
    assert [meta["key"] for meta, _ in store.verify([store.read_meta(manifest_file)])] == [wrong_manifest["key"]]
    real_hash_tree = hashing.hash_tree

    def unreadable(path: Path, **kwargs: Any) -> str:
        if Path(path).name == names[fine["key"]]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_hash_tree(path, **kwargs)

    monkeypatch.setattr(hashing, "hash_tree", unreadable)
    in_order = sorted(store.entries(), key=lambda meta: Path(meta["path"]).name)
    in_order.remove(next(meta for meta in in_order if meta["key"] == fine["key"]))
    problems_now = [(Path(meta["path"]).name, problem) for meta, problem in store.verify([store.read_meta(
        Path(fine["path"] + ".json")), *in_order])]  # the unreadable one first
    assert problems_now[0] == (names[fine["key"]], f"unreadable: [Errno 13] Permission denied: '{fine['path']}'")
    assert len(problems_now) == 5  # every other entry was still checked after it


def test_has_checks_an_entry_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")
    drv, _meta = _entry(store, "once")
    other = Store(tmp_path / "other")
    calls: list[str] = []
    real = Store.seal_problems

    def counted(self: Store, key: str, path: Path) -> list[str]:
        calls.append(str(self.root))
        return real(self, key, path)

    monkeypatch.setattr(Store, "seal_problems", counted)
    assert store.has(drv) and store.has(drv) and calls == [str(store.root)]  # the second time from memory
    other.realise(drv, log=quiet)
    calls.clear()
    assert other.has(drv) and calls == [str(other.root)]  # another store's entry under the same key: checked


def test_an_entry_whose_directory_is_gone_is_not_there_and_not_quarantined(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    drv, meta = _entry(store, "gone")
    _writable(Path(meta["path"]))
    shutil.rmtree(meta["path"])
    assert store.has(drv) is False
    assert not (store.root / ".corrupt").exists() or not list((store.root / ".corrupt").iterdir())
    assert store.meta_path(drv).is_file()  # left for the rebuild to replace, not moved aside


def test_a_build_commits_its_signed_provenance_and_a_substitution_makes_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = SecretKey.generate("test-1")
    secret, _public = key.write(tmp_path)
    monkeypatch.setenv(SIGNING_KEY_ENV, str(secret))
    store = Store(tmp_path / "store")
    drv, meta = _entry(store, "signed")
    envelope = dsse.read(store.provenance_path(drv))
    verified = dsse.verify(envelope, [key.public()])
    assert verified.ok and verified.statement is not None
    subjects = {subject["name"]: subject["digest"] for subject in verified.statement["subject"]}
    assert subjects["f0.txt"]["blake3"] == hashing.hash_file(Path(meta["path"]) / "f0.txt", use_cache=False)
    assert not list((store.root / ".tmp").glob("*/provenance.json"))
    logs = verified.statement["predicate"]["runDetails"].get("byproducts", [])
    assert [log["name"] for log in logs] == ["build.log"]  # the build's log, hashed as it was committed

    # Downstream: its provenance names the upstream entry by key and the digest of that entry's envelope.
    down = Derivation("verify", "down", copy_up, {"up": drv})
    store.realise(down, log=quiet)
    statement = dsse.verify(dsse.read(store.provenance_path(down)), [key.public()]).statement
    assert statement is not None
    (up,) = [dep for dep in statement["predicate"]["buildDefinition"]["resolvedDependencies"]
             if dep.get("annotations", {}).get("input") == "up"]
    assert up["annotations"]["key"] == drv.key
    assert up["annotations"]["provenanceSha256"] == dsse.sha256_of(store.provenance_path(drv))

    # A substitution (a cache download unpacked into tmp/out) is committed without making provenance here.
    substituted = Derivation("verify", "substituted", write_files, params={"text": "substituted"})
    tmp = store.root / ".tmp" / f"{substituted.key}-test"
    (tmp / "out").mkdir(parents=True)
    (tmp / "out" / "f0.txt").write_text("substituted 0\n")
    with store.lock(substituted.key):
        store.commit(substituted, tmp, 1_700_000_000, {"substituted_from": "file:///cache"})
    assert store.has(substituted) and not store.provenance_path(substituted).exists()


def test_garbled_metadata_does_not_hide_the_entries_after_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    metas = [_entry(store, f"e{index}")[1] for index in range(4)]
    first = sorted(metas, key=lambda meta: Path(meta["path"]).name)[0]
    Path(first["path"] + ".json").write_text("{not json")
    listed = {meta["key"] for meta in store.entries()}
    assert listed == {meta["key"] for meta in metas} - {first["key"]}


def test_an_intact_entry_is_checked_by_its_stamp_and_an_old_record_is_restamped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from eulerbake.store import seal

    store = Store(tmp_path / "store")
    _drv, meta = _entry(store, "stamped")
    path, record_file = Path(meta["path"]), store.seal_path(meta["key"])
    real_check = seal.check
    checks: list[Path] = []

    def counted(tree: Path, sealed: dict[str, Any]) -> list[str]:
        checks.append(tree)
        return real_check(tree, sealed)

    monkeypatch.setattr(seal, "check", counted)
    assert store.seal_problems(meta["key"], path) == [] and checks == []  # the stamp alone said intact

    record = json.loads(record_file.read_text())
    del record["stamp"]
    record_file.write_text(json.dumps(record, sort_keys=True))  # a record from before stamps
    assert store.seal_problems(meta["key"], path) == [] and checks == [path]  # checked in full …
    restamped = json.loads(record_file.read_text())
    assert restamped == {**record, "stamp": seal.stamp(path)}  # … and stamped, for this key's record
    assert record_file.read_text().startswith('{"stamp": "') and sorted(p.name for p in record_file.parent.iterdir()) \
        == [record_file.name]
    assert store.seal_problems(meta["key"], path) == [] and checks == [path]  # the shortcut again


def test_a_stamp_that_cannot_be_taken_is_never_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the tree's stamp cannot be taken (an unreadable directory), the full check decides and the record
    keeps the stamp it had: a placeholder written instead would make every later check a full one."""
    from eulerbake.store import seal

    store = Store(tmp_path / "store")
    _drv, meta = _entry(store, "unstampable")
    path, record_file = Path(meta["path"]), store.seal_path(meta["key"])
    before = record_file.read_bytes()

    def unreadable(_tree: Path) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(seal, "stamp", unreadable)
    assert store.seal_problems(meta["key"], path) == []  # the full check found it intact
    assert record_file.read_bytes() == before


def test_verify_never_believes_the_stat_cache(tmp_path: Path) -> None:
    """`store verify` re-hashes from disk: a wrong answer in the stat cache for an intact file is not a problem."""
    store = Store(tmp_path / "store")
    _drv, meta = _entry(store, "cached")
    hashing.use_stat_cache(tmp_path / "stat.sqlite3")
    try:
        assert hashing._stat_cache is not None
        inside = Path(meta["path"]) / "f0.txt"
        hashing._stat_cache.remember(inside, inside.stat(), "0" * 64, None)
        assert hashing.hash_file(inside) == "0" * 64  # the poison is in place
        assert store.verify([meta]) == []
    finally:
        hashing.use_stat_cache(None)
