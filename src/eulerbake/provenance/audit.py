"""Audit: from an AMI, a store entry or a file back to the pinned sources, every link checked.

Where an audit starts:
- an AMI id: `describe_images` (boto3's standard credential chain) → its `eulerbake:key` tag → the
  publication's store entry, whose receipt must name that AMI (and whose disk's provenance must hash to
  the `eulerbake:raw-provenance-sha256` tag, when the AMI carries one);
- a store entry (`store/<key>-<name>`, a key prefix, a task's entry);
- a file: its blake3 looked up in the entries' seal records, its sha256 in their provenance subjects — a
  file that matches nothing was not made by eulerbake, and the audit says so and fails.

For each entry it verifies the DSSE envelope against the trusted keys, checks that the statement is this
entry's (invocation id, the manifest hashing to the key, the output hash) and that every subject still
hashes as recorded; then it follows `resolvedDependencies`: upstream entries (by key, output digest and
the sha256 of their own envelope) recursively, local files, trees and code modules re-hashed where they
are found (an edit after the build is *drift*), the recipe commit looked up in the checkout. The result is
a tree of checks; it passes when nothing failed (and nothing drifted, unless drift is allowed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from eulerbake.core import hashing
from eulerbake.core.errors import EulerbakeError
from eulerbake.provenance import dsse, provenance_path
from eulerbake.provenance.statement import PREDICATE_TYPE, STATEMENT_TYPE, file_digests, listing_digest, tree_digests
from eulerbake.store.local import Store
from eulerbake.store.signing import PublicKey
from eulerbake.tools.run import run

PASS, WARN, DRIFT, FAIL = "pass", "warn", "drift", "fail"
SEVERITY = {PASS: 0, WARN: 1, DRIFT: 2, FAIL: 3}
AMI_RE = re.compile(r"^ami-[0-9a-f]{8,17}$")
KEY_TAG = "eulerbake:key"
RAW_PROVENANCE_TAG = "eulerbake:raw-provenance-sha256"
STORE_KINDS = ("derivation", "publication", "fixed-output")


@dataclass
class Check:
    name: str
    status: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


@dataclass
class AuditNode:
    """One thing in the chain (an entry, a file, a tree, a module, the recipe commit, an AMI) and its checks."""

    kind: str
    label: str
    checks: list[Check] = field(default_factory=list)
    children: list[AuditNode] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def status(self) -> str:
        statuses = [c.status for c in self.checks] + [child.status for child in self.children]
        return max(statuses, key=SEVERITY.__getitem__, default=PASS)

    def walk(self) -> Iterator[AuditNode]:
        yield self
        for child in self.children:
            yield from child.walk()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "status": self.status, "info": self.info,
                "checks": [c.to_json() for c in self.checks], "children": [c.to_json() for c in self.children]}


@dataclass
class AuditResult:
    query: str
    root: AuditNode
    allow_drift: bool = False

    @property
    def ok(self) -> bool:
        worst = self.root.status
        return worst in (PASS, WARN) or (worst == DRIFT and self.allow_drift)

    def problems(self) -> list[str]:
        """Every failed (or drifted) check, as `label: name: detail` lines."""
        bad = {FAIL} if self.allow_drift else {FAIL, DRIFT}
        return [f"{node.label}: {c.name}: {c.detail}" for node in self.root.walk() for c in node.checks
                if c.status in bad]

    def to_json(self) -> dict[str, Any]:
        return {"query": self.query, "ok": self.ok, "problems": self.problems(), "tree": self.root.to_json()}


def _short(digest: str) -> str:
    return f"{digest[:16]}…" if len(digest) > 16 else digest


def _uri_path(uri: str) -> Path | None:
    parsed = urlsplit(uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


class Auditor:
    """Walks entries of one store; each entry is audited once (a shared input appears once, then by reference)."""

    def __init__(self, store: Store, trusted: Sequence[PublicKey], *, project_root: Path | None = None) -> None:
        self.store = store
        self.trusted = list(trusted)
        self.project_root = project_root.absolute() if project_root is not None else None
        self.by_key = {meta["key"]: meta for meta in store.entries()}
        self.audited: dict[str, AuditNode] = {}
        self.statements: dict[str, dict[str, Any]] = {}  # key → verified statement (for `check`, the CLI)

    # -- entries ----------------------------------------------------------------------------------------
    def entry(self, meta: Mapping[str, Any], link: list[Check] | None = None) -> AuditNode:
        key = str(meta["key"])
        if key in self.audited:
            ref = AuditNode("entry", str(meta["task"]), list(link or []),
                            info={"key": key, "path": meta.get("path", ""), "seen": True})
            ref.check("audited", PASS, "audited above")
            return ref
        node = AuditNode("entry", str(meta["task"]), list(link or []),
                         info={"key": key, "kind": meta.get("kind", ""), "path": meta.get("path", "")})
        self.audited[key] = node
        entry = Path(str(meta.get("path") or ""))
        problems = self.store.seal_problems(key, entry)
        node.check("sealed", FAIL if problems else PASS,
                   "; ".join(problems[:3]) if problems else "the output is what was sealed at commit")
        statement = self._verified_statement(node, entry)
        if statement is None:
            node.children += self._from_manifest(meta)
            return node
        self.statements[key] = statement
        self._check_statement(node, meta, statement)
        self._check_subjects(node, entry, statement)
        definition = statement.get("predicate", {}).get("buildDefinition", {})
        dependencies = definition.get("resolvedDependencies") or []
        repository = next((Path(str(d["annotations"]["path"])) for d in dependencies
                           if (d.get("annotations") or {}).get("kind") == "git"
                           and (d.get("annotations") or {}).get("path")), None)
        for descriptor in dependencies:
            if isinstance(descriptor, Mapping):
                node.children.append(self.dependency(descriptor, repository))
        return node

    def _verified_statement(self, node: AuditNode, entry: Path) -> dict[str, Any] | None:
        path = provenance_path(entry)
        node.info["provenance"] = str(path)
        try:
            envelope = dsse.read(path)
        except EulerbakeError as err:
            node.check("provenance", FAIL, err.message)
            return None
        node.info["provenanceSha256"] = dsse.sha256_of(path)
        verified = dsse.verify(envelope, self.trusted)
        if verified.ok:
            node.check("signature", PASS, f"signed by trusted key {verified.signer}")
        else:
            node.check("signature", FAIL, f"the provenance does not verify: {verified.reason}")
        return verified.statement

    def _check_statement(self, node: AuditNode, meta: Mapping[str, Any], statement: Mapping[str, Any]) -> None:
        key = str(meta["key"])
        predicate = statement.get("predicate") or {}
        definition = predicate.get("buildDefinition") or {}
        internal = definition.get("internalParameters") or {}
        invocation = (predicate.get("runDetails") or {}).get("metadata", {}).get("invocationId")
        wrong = []
        if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
            wrong.append(f"not an in-toto v1 statement with a SLSA v1 predicate ({statement.get('predicateType')})")
        if invocation != key:
            wrong.append(f"its invocation id is {invocation!r}, not the entry's key")
        manifest = internal.get("manifest")
        if not isinstance(manifest, Mapping) or hashing.hash_json(manifest)[: len(key)] != key:
            wrong.append("its manifest does not hash to the entry's key")
        elif manifest != meta.get("manifest"):
            wrong.append("its manifest differs from the store's metadata")
        if internal.get("outputHash") != meta.get("output", {}).get("hash"):
            wrong.append("its output hash differs from the store's metadata")
        node.check("statement", FAIL if wrong else PASS,
                   "; ".join(wrong) if wrong else "describes this entry (key, manifest, output hash)")
        external = definition.get("externalParameters") or {}
        node.info.update({k: external[k] for k in ("task", "release", "arch") if k in external})
        builder = (predicate.get("runDetails") or {}).get("builder") or {}
        node.info["builder"] = builder.get("id", "")
        node.info["tools"] = {d.get("name"): (d.get("annotations") or {}).get("version")
                              for d in builder.get("builderDependencies") or [] if isinstance(d, Mapping)}

    def _check_subjects(self, node: AuditNode, entry: Path, statement: Mapping[str, Any]) -> None:
        subjects = [s for s in statement.get("subject") or [] if isinstance(s, Mapping)]
        files = tree_digests(entry) if entry.is_dir() else {}
        named = {str(s.get("name")): s for s in subjects}
        bad = []
        for name, digest in files.items():
            recorded = (named.get(name) or {}).get("digest") or {}
            if not recorded:
                bad.append(f"{name} is not a subject")
            elif any(recorded.get(algo) not in (None, value) for algo, value in digest.items()) \
                    or recorded.get("sha256") != digest["sha256"]:
                bad.append(f"{name} hashes to sha256 {_short(digest['sha256'])}, the statement says "
                           f"{_short(str(recorded.get('sha256')))}")
        resources = [s for s in subjects if (s.get("annotations") or {}).get("kind") in
                     ("aws-ami", "aws-ebs-snapshot", "maas-boot-resource")]
        if not files and not subjects:
            bad.append("the statement names no subject")
        elif not files:
            empty = listing_digest({})
            if not any(s.get("digest", {}).get("sha256") == empty["sha256"] for s in subjects):
                bad.append("the entry is empty but the statement names files")
        missing = [name for name in named if name not in files and named[name] not in resources
                   and not name.startswith(Path(entry).name)]
        bad += [f"{name} is a subject but is not in the entry" for name in missing]
        node.check("subjects", FAIL if bad else PASS, "; ".join(bad[:5]) if bad else
                   f"{len(files)} output file(s) hash to their subjects' sha256 and blake3")
        if resources:
            node.info["published"] = [{"name": s.get("name"), "uri": s.get("uri")} for s in resources]

    def _from_manifest(self, meta: Mapping[str, Any]) -> list[AuditNode]:
        """Without a statement: the upstream entries the metadata names, walked all the same."""
        found = []
        for name, recorded in sorted((meta.get("manifest", {}).get("inputs") or {}).items()):
            if "key" in recorded and recorded["key"] in self.by_key:
                found.append(self.entry(self.by_key[recorded["key"]], [Check("input", PASS, f"input {name}")]))
            elif "key" in recorded:
                missing = AuditNode("entry", name, info={"key": recorded["key"]})
                missing.check("present", WARN, "not in this store: cannot walk further")
                found.append(missing)
            else:
                local = AuditNode(str(recorded.get("kind", "local")), name, info={"blake3": recorded.get("blake3")})
                local.check("recorded", WARN, "only its blake3 is known (no provenance names its path)")
                found.append(local)
        return found

    # -- dependencies -----------------------------------------------------------------------------------
    def dependency(self, descriptor: Mapping[str, Any], repository: Path | None) -> AuditNode:
        annotations = descriptor.get("annotations") or {}
        kind = str(annotations.get("kind", ""))
        digest = descriptor.get("digest") or {}
        if kind in STORE_KINDS:
            return self._upstream(descriptor, annotations, digest)
        label = str(descriptor.get("name", descriptor.get("uri", "?")))
        node = AuditNode(kind or "dependency", label, info={"uri": descriptor.get("uri", ""), "digest": dict(digest)})
        if kind in ("file", "tree", "code"):
            self._rehash(node, annotations, descriptor, digest, repository)
        elif kind == "git":
            self._git(node, annotations, digest)
        elif kind == "url":
            node.check("pinned", PASS if digest.get("sha256") else FAIL,
                       f"fetched from {descriptor.get('uri')}, pinned by sha256 {_short(str(digest.get('sha256')))}")
        else:
            node.check("recorded", PASS, "recorded as given (nothing here to re-check)")
        return node

    def _upstream(self, descriptor: Mapping[str, Any], annotations: Mapping[str, Any], digest: Mapping[str, Any]
                  ) -> AuditNode:
        key = str(annotations.get("key", ""))
        name = str(descriptor.get("name", ""))
        meta = self.by_key.get(key)
        if meta is None:
            node = AuditNode("entry", str(annotations.get("task", name)),
                             info={"key": key, "uri": descriptor.get("uri")})
            node.check("present", WARN, f"input {name} (key {key}) is not in this store: cannot walk further "
                       "(fetch it from the cache, or audit on the machine that built it)")
            return node
        link: list[Check] = []
        entry = Path(str(meta["path"]))
        if annotations.get("kind") == "fixed-output":
            current = file_digests(entry / str(annotations.get("filename", "")), use_cache=True) \
                if (entry / str(annotations.get("filename", ""))).is_file() else {}
            same = bool(current) and all(digest.get(a) == current.get(a) for a in ("sha256", "blake3"))
            pins = _short(str(digest.get("sha256")))
            link.append(Check("input", PASS if same else FAIL,
                              f"input {name}: the source file matches its pins (sha256 {pins}), fetched from "
                              f"{descriptor.get('uri')}" if same else
                              f"input {name}: the source in the store does not match the recorded sha256/blake3"))
        else:
            same = digest.get("blake3") == meta["output"]["hash"]
            link.append(Check("input", PASS if same else FAIL,
                              f"input {name}: output hash {_short(str(digest.get('blake3')))} as recorded" if same else
                              f"input {name}: the entry's output hash {_short(meta['output']['hash'])} is not the "
                              f"recorded {_short(str(digest.get('blake3')))}"))
        recorded_envelope = annotations.get("provenanceSha256")
        envelope = provenance_path(entry)
        if recorded_envelope and envelope.is_file() and dsse.sha256_of(envelope) != recorded_envelope:
            now = _short(dsse.sha256_of(envelope))
            link.append(Check("chain", WARN, f"its provenance was rewritten after {name}'s consumer was built "
                              f"(sha256 {now}, recorded {_short(str(recorded_envelope))})"))
        return self.entry(meta, link)

    def _candidates(self, annotations: Mapping[str, Any], descriptor: Mapping[str, Any],
                    repository: Path | None) -> list[Path]:
        found: list[Path] = []
        recorded = str(annotations.get("path", ""))
        if recorded and not Path(recorded).is_absolute():
            found += [base / recorded for base in (self.project_root, repository) if base is not None]
        elif recorded:
            found.append(Path(recorded))
        from_uri = _uri_path(str(descriptor.get("uri", "")))
        if from_uri is not None:
            found.append(from_uri)
        return found

    def _rehash(self, node: AuditNode, annotations: Mapping[str, Any], descriptor: Mapping[str, Any],
                digest: Mapping[str, Any], repository: Path | None) -> None:
        kind = str(annotations.get("kind"))
        candidates = self._candidates(annotations, descriptor, repository)
        exists = Path.is_dir if kind == "tree" else Path.is_file
        path = next((p for p in candidates if exists(p)), None)
        node.label = f"{annotations.get('module') or descriptor.get('name')} ({annotations.get('path', '')})" \
            if kind == "code" else f"{descriptor.get('name')}: {annotations.get('path', descriptor.get('uri', ''))}"
        if path is None:
            looked = ", ".join(str(p) for p in candidates) or "nothing"
            node.check("present", WARN, f"not found here (looked at {looked}): cannot re-hash it")
            return
        node.info["found"] = str(path)
        recorded = str(digest.get("blake3", ""))
        now = hashing.hash_tree(path, use_cache=False) if kind == "tree" else hashing.hash_file(path, use_cache=False)
        if now == recorded:
            node.check("rehash", PASS, f"{path} still hashes to the recorded blake3 {_short(recorded)}")
        else:
            what = "module" if kind == "code" else "input"
            node.check("rehash", DRIFT, f"{path} was edited after the build: the {what} now hashes to blake3 "
                       f"{_short(now)}, the provenance recorded {_short(recorded)}")

    def _git(self, node: AuditNode, annotations: Mapping[str, Any], digest: Mapping[str, Any]) -> None:
        commit = str(digest.get("gitCommit", ""))
        node.label = f"recipes {commit[:12] or '(no commit)'}" + (" (dirty)" if annotations.get("dirty") else "")
        if annotations.get("error"):
            node.check("recorded", WARN, str(annotations["error"]))
            return
        if annotations.get("dirty"):
            node.check("clean", WARN, "built from a checkout with uncommitted changes (the code modules' hashes "
                       "pin what ran)")
        checkouts = [p for p in (self.project_root, Path(str(annotations.get("path", "")))) if p is not None]
        for checkout in checkouts:
            if not checkout.is_dir():
                continue
            try:
                proc = run(["git", "-C", str(checkout), "cat-file", "-e", f"{commit}^{{commit}}"], check=False)
            except EulerbakeError:
                break
            if proc.returncode == 0:
                node.check("commit", PASS, f"commit {commit[:12]} is in {checkout}")
                return
        node.check("commit", WARN, f"commit {commit[:12]} is not in a checkout here: cannot look at it")


# -- starting points -------------------------------------------------------------------------------------


def audit_entry(store: Store, meta: Mapping[str, Any], trusted: Sequence[PublicKey], *,
                project_root: Path | None = None, allow_drift: bool = False, query: str = "") -> AuditResult:
    auditor = Auditor(store, trusted, project_root=project_root)
    return AuditResult(query or str(meta["task"]), auditor.entry(meta), allow_drift)


def entries_with_file(store: Store, digests: Mapping[str, str]) -> list[tuple[dict[str, Any], str]]:
    """(entry metadata, path inside it) of every output file with these blake3/sha256 digests.

    blake3 from the seal records (one small JSON per entry), sha256 from the provenance subjects.
    """
    by_key = {meta["key"]: meta for meta in store.entries()}
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for record in sorted((store.root / ".seals").glob("*.json")) if store.root.is_dir() else []:
        try:
            entries = json.loads(record.read_text()).get("entries", {})
        except (OSError, ValueError):
            continue
        for relative, value in entries.items():
            if value and value[0] == "f" and value[-1] == digests.get("blake3") and record.stem in by_key:
                found[(record.stem, relative)] = by_key[record.stem]
    for meta in by_key.values():
        path = provenance_path(Path(meta["path"]))
        if not path.is_file():
            continue
        try:
            statement = dsse.decode(dsse.read(path))[1] or {}
        except EulerbakeError:
            continue
        for subject in statement.get("subject") or []:
            if isinstance(subject, Mapping) and (subject.get("digest") or {}).get("sha256") == digests.get("sha256"):
                found[(meta["key"], str(subject.get("name")))] = meta
    return [(meta, relative) for (_key, relative), meta in sorted(found.items())]


def audit_file(store: Store, path: Path, trusted: Sequence[PublicKey], *, project_root: Path | None = None,
               allow_drift: bool = False) -> AuditResult:
    """Which entries made this file (by content), and their audits; a file no entry made fails."""
    digests = file_digests(path, use_cache=False)
    root = AuditNode("file", str(path), info=dict(digests))
    matches = entries_with_file(store, digests)
    if not matches:
        root.check("made by eulerbake", FAIL,
                   f"{path} was not made by eulerbake: its sha256 {digests['sha256']} matches no output in the store "
                   f"at {store.root} (no seal record or provenance subject has it)")
        return AuditResult(str(path), root, allow_drift)
    auditor = Auditor(store, trusted, project_root=project_root)
    for meta, relative in matches:
        link = [Check("made by eulerbake", PASS, f"the file is {relative} of {Path(meta['path']).name}")]
        root.children.append(auditor.entry(meta, link))
    return AuditResult(str(path), root, allow_drift)


def ec2_client(region: str | None, endpoint_url: str | None) -> Any:
    """An EC2 client from boto3's standard chain (profile, environment, SSO, instance role)."""
    import boto3

    return boto3.session.Session(region_name=region or None).client("ec2", endpoint_url=endpoint_url or None)


def describe_image(ec2: Any, ami_id: str) -> dict[str, Any]:
    try:
        images = ec2.describe_images(ImageIds=[ami_id])["Images"]
    except Exception as exc:  # botocore's errors: no credentials, no region, an unknown id, an unreachable endpoint
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", "")) if hasattr(exc, "response") else ""
        if code.startswith("InvalidAMIID"):
            raise EulerbakeError(f"there is no AMI {ami_id} in this account and region ({code})",
                                 hint="pass --region (and --endpoint-url), or set AWS_PROFILE to the account") from None
        raise EulerbakeError(f"could not describe {ami_id}: {type(exc).__name__}: {exc}",
                             hint="check the region (--region / AWS_REGION) and the credentials (AWS_PROFILE)"
                             ) from None
    if not images:
        raise EulerbakeError(f"there is no AMI {ami_id} in this account and region",
                             hint="pass --region (and --endpoint-url), or set AWS_PROFILE to the account")
    image: dict[str, Any] = images[0]
    return image


def audit_ami(store: Store, ami_id: str, trusted: Sequence[PublicKey], *, ec2: Any,
              project_root: Path | None = None, allow_drift: bool = False) -> AuditResult:
    """The AMI's tags → the publication's entry → its chain; the receipt and tags must agree with the store."""
    image = describe_image(ec2, ami_id)
    tags = {tag.get("Key"): tag.get("Value") for tag in image.get("Tags") or []}
    root = AuditNode("ami", ami_id, info={"name": image.get("Name", ""), "tags": tags})
    key = tags.get(KEY_TAG)
    if not key:
        root.check("made by eulerbake", FAIL, f"{ami_id} has no {KEY_TAG} tag: it was not published by eulerbake")
        return AuditResult(ami_id, root, allow_drift)
    meta = next((m for m in store.entries() if m["key"] == key), None)
    if meta is None:
        root.check("entry", FAIL, f"{ami_id} is tagged with key {key}, but the store at {store.root} has no such entry",
                   )
        return AuditResult(ami_id, root, allow_drift)
    entry = Path(meta["path"])
    link: list[Check] = [Check("tag", PASS, f"{KEY_TAG} = {key}")]
    try:
        resource = json.loads((entry / "receipt.json").read_text()).get("resource", {})
    except (OSError, ValueError):
        resource = {}
    if resource.get("image_id") == ami_id:
        link.append(Check("receipt", PASS, f"the receipt names {ami_id} ({resource.get('region', '')})"))
    else:
        link.append(Check("receipt", FAIL, f"the entry's receipt names {resource.get('image_id')!r}, not {ami_id}"))
    raw_key = tags.get("eulerbake:raw-key", "")
    inputs = meta.get("manifest", {}).get("inputs", {})
    if raw_key and not any(value.get("key") == raw_key for value in inputs.values()):
        link.append(Check("raw-key", FAIL, f"the AMI's eulerbake:raw-key {raw_key} is not an input of the entry"))
    recorded = tags.get(RAW_PROVENANCE_TAG)
    if recorded:
        raw = next((m for m in store.entries() if m["key"] == raw_key), None)
        envelope = provenance_path(Path(raw["path"])) if raw else None
        actual = dsse.sha256_of(envelope) if envelope is not None and envelope.is_file() else None
        link.append(Check("provenance tag", PASS if actual == recorded else FAIL,
                          f"the disk's provenance hashes to the {RAW_PROVENANCE_TAG} tag" if actual == recorded else
                          f"the {RAW_PROVENANCE_TAG} tag is {_short(recorded)}, the disk's provenance "
                          f"{'hashes to ' + _short(actual) if actual else 'is missing'}"))
    auditor = Auditor(store, trusted, project_root=project_root)
    root.children.append(auditor.entry(meta, link))
    return AuditResult(ami_id, root, allow_drift)


def entries_of(result: AuditResult) -> list[AuditNode]:
    """The entry nodes of an audit, each once (for rebuilding them)."""
    return [n for n in result.root.walk() if n.kind == "entry" and "kind" in n.info and not n.info.get("seen")]

