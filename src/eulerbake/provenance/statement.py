"""The provenance of one store entry: an in-toto Statement v1 with a SLSA Provenance v1 predicate.

Built from the entry's metadata (manifest, output hash, the tools that ran, build times) and its node
(where local inputs live, which URLs a source was pinned from, which recipe repository the builder came
from):

- `subject`: every regular file of the output, by its path inside the entry, with **sha256** (what in-toto
  consumers check) and blake3 beside it (an extra digest name, which consumers ignore); a publication adds
  what it made: an AMI (its id and ARN, and its snapshot's) or a MAAS boot resource (its id and URL);
- `buildDefinition`: `buildType` `eulerbake:buildtype/<kind>/v1`; `externalParameters` the task, stage,
  label, release, arch and the stage's parameters (a publication's target, a source's pins);
  `internalParameters` the manifest whose blake3 is the key; `resolvedDependencies` every input — pinned
  sources by URL + sha256/blake3, local files and trees, upstream entries by key and output digest (and
  the sha256 of their own envelope: the chain is a hash chain), the builder's code modules, and the
  recipe repository's git commit with a dirty flag;
- `runDetails`: builder id (`EULERBAKE_BUILDER_ID`, else this host), eulerbake's version, the external
  tools that really ran with their versions (metadata `tools`), start and finish times, the key as
  invocation id, and the build log as a byproduct.

A directory's sha256 (a local tree, an upstream entry) is Go's dirhash "h1" construction: the sha256 of
the lines `<sha256 hex>  <relative path>\\n` over its regular files in sorted order, given both as
`sha256` (hex) and as in-toto's `dirHash` (`h1:` + base64).

No secret goes in: no environment variable is copied in (EULERBAKE_BUILDER_ID names the builder), a git
remote or mirror URL loses its user:password part, a publication's target holds none by design, and a
statement holding the value of a known secret (the publication's credentials, or any environment variable
named like a secret) is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from eulerbake import __version__
from eulerbake.core import hashing
from eulerbake.core.code import module_file
from eulerbake.core.derivation import FixedOutput, Node
from eulerbake.core.errors import EulerbakeError
from eulerbake.core.publication import RECEIPT, secret_forms
from eulerbake.provenance import SIGNING_KEY_ENV, dsse, provenance_path
from eulerbake.store.local import Store, source_date_epoch
from eulerbake.store.signing import SecretKey
from eulerbake.tools.packages import TOOLS
from eulerbake.tools.run import run

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE_PREFIX = "eulerbake:buildtype/"
BUILDER_ID_ENV = "EULERBAKE_BUILDER_ID"  # CI sets it to the runner's identity (e.g. the workflow URL)
ARCHES = ("x86_64", "aarch64")
# Environment variables whose values must never appear in a provenance document.
SECRET_NAME_RE = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|PRIVATE_KEY", re.IGNORECASE)
MIN_SECRET_LENGTH = 8  # shorter values ("1", "yes") would match everywhere and protect nothing


def build_type(kind: str) -> str:
    return f"{BUILD_TYPE_PREFIX}{kind}/v1"


def entry_uri(key: str, name: str) -> str:
    return f"eulerbake:store/{key}-{name}"


# -- digests ---------------------------------------------------------------------------------------------


def file_digests(path: Path, *, use_cache: bool = True) -> dict[str, str]:
    """{sha256, blake3} of a file, in one read (the stat cache serves an unchanged file)."""
    b3, sha = hashing.hash_file_pair(path, use_cache=use_cache)
    return {"sha256": sha, "blake3": b3}


def tree_digests(root: Path, *, use_cache: bool = True) -> dict[str, dict[str, str]]:
    """{relative path: {sha256, blake3}} of every regular file below `root` (symlinks are not subjects)."""
    found: dict[str, dict[str, str]] = {}
    for path in hashing.tree_files(root):
        if path.is_symlink() or not path.is_file():
            continue
        found[path.relative_to(root).as_posix()] = file_digests(path, use_cache=use_cache)
    return dict(sorted(found.items()))


def listing_digest(files: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """A directory's {sha256, dirHash}: Go's dirhash h1 over the files' sha256 (see the module docstring)."""
    summary = hashlib.sha256()
    for name in sorted(files):
        if "\n" in name:
            raise EulerbakeError(f"cannot describe a file whose name holds a newline: {name!r}")
        summary.update(f"{files[name]['sha256']}  {name}\n".encode())
    raw = summary.digest()
    return {"sha256": raw.hex(), "dirHash": "h1:" + base64.b64encode(raw).decode()}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def public_url(location: str) -> str:
    """A URL safe to record: a local path becomes file://, an http(s) URL loses its user:password part."""
    parsed = urllib.parse.urlsplit(location)
    if not parsed.scheme or len(parsed.scheme) == 1:  # a path (a Windows drive letter is not a scheme either)
        return Path(location).absolute().as_uri()
    if parsed.scheme in ("http", "https", "ftp", "s3", "git+https", "ssh") and "@" in parsed.netloc:
        host = parsed.netloc.rpartition("@")[2]
        parsed = parsed._replace(netloc=host)
    return urllib.parse.urlunsplit(parsed)


def _relative(path: Path, repository: Path | None) -> str:
    absolute = path.absolute()
    if repository is not None and absolute.is_relative_to(repository):
        return absolute.relative_to(repository).as_posix()
    return str(absolute)


# -- the recipe repository ------------------------------------------------------------------------------


def repository_of(node: Node) -> Path:
    """The directory whose git state names the recipe revision: where the builder's (publisher's) module lives."""
    module = ""
    builder = getattr(node, "builder", None)
    publisher = getattr(node, "publisher", None)
    if builder is not None:
        module = getattr(builder, "__module__", "") or ""
    elif publisher is not None:
        module = type(publisher).__module__
    found = module_file(module) if module else None
    return found.parent if found is not None else Path.cwd()


def _git(directory: Path, *args: str) -> str | None:
    try:
        proc = run(["git", "-C", str(directory), *args], check=False, timeout=60)
    except EulerbakeError:
        return None
    return proc.stdout.decode(errors="replace").strip() if proc.returncode == 0 else None


def git_dependency(directory: Path) -> dict[str, Any]:
    """The recipe repository as a resolved dependency: remote (credentials stripped), commit, dirty flag.

    Dirty means tracked changes or untracked files git does not ignore (a new recipe module not yet
    committed): the commit alone would not rebuild this. The code modules' blake3s pin it either way.
    """
    where = directory.absolute()
    if shutil.which("git") is None:
        return {"name": "recipes", "uri": where.as_uri(), "annotations": {"kind": "git", "error": "git is not "
                "installed here: the recipe revision is known only by the code modules' hashes"}}
    top = _git(where, "rev-parse", "--show-toplevel")
    if top is None:
        return {"name": "recipes", "uri": where.as_uri(),
                "annotations": {"kind": "git", "error": f"{where} is not in a git repository"}}
    commit = _git(Path(top), "rev-parse", "--verify", "-q", "HEAD^{commit}")
    status = _git(Path(top), "status", "--porcelain")
    remote = _git(Path(top), "config", "--get", "remote.origin.url")
    branch = _git(Path(top), "symbolic-ref", "-q", "--short", "HEAD")
    uri = f"git+{public_url(remote)}" if remote else f"git+{Path(top).as_uri()}"
    if branch:
        uri += f"@refs/heads/{branch}"
    descriptor: dict[str, Any] = {"name": "recipes", "uri": uri,
                                  "annotations": {"kind": "git", "dirty": bool(status), "path": top}}
    if commit:
        descriptor["digest"] = {"gitCommit": commit}
    else:
        descriptor["annotations"]["error"] = "the repository has no commit yet"
    return descriptor


# -- the parts of the statement ---------------------------------------------------------------------------


def _release_arch(node: Node, manifest: Mapping[str, Any]) -> dict[str, str]:
    """Release and arch of a cell (`<release>:<arch>` labels, or the params/target naming them)."""
    found: dict[str, str] = {}
    for source in (manifest.get("target") or {}, manifest.get("params") or {}):
        if isinstance(source, Mapping):
            for field in ("release", "arch"):
                if isinstance(source.get(field), str) and source[field] and field not in found:
                    found[field] = source[field]
    parts = node.label.split(":") if node.label else []
    if "arch" not in found and parts and parts[-1] in ARCHES:
        found["arch"] = parts[-1]
    if "release" not in found and len(parts) >= 2 and parts[-1] in ARCHES:
        found["release"] = parts[0]
    return found


def external_parameters(node: Node, manifest: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {"task": node.task_name, "stage": node.stage, "label": node.label,
                              **_release_arch(node, manifest)}
    if isinstance(node, FixedOutput):
        params["source"] = {"filename": node.filename, "urls": [public_url(url) for url in node.urls],
                            "sha256": node.sha256, "blake3": node.blake3, "size": node.size}
    elif "target" in manifest:
        params["target"] = manifest["target"]
    else:
        params["params"] = manifest.get("params", {})
    return params


def _envelope_sha256(entry: Path) -> str | None:
    path = provenance_path(entry)
    return dsse.sha256_of(path) if path.is_file() else None


def _store_dependency(store: Store, name: str, dep: Node, *, after: bool = False
                      ) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """An upstream entry as a resolved dependency, and its files' digests."""
    meta_file = store.meta_path(dep)
    if not meta_file.is_file():
        raise EulerbakeError(f"the input {name} ({dep.task_name}) is not in the store {store.root}",
                             hint=f"build it first: doit {dep.task_name}")
    dep_meta = store.read_meta(meta_file)
    files = tree_digests(store.path(dep))
    annotations: dict[str, Any] = {"kind": dep.kind, "input": name, "key": dep.key, "task": dep.task_name}
    if after:
        annotations["after"] = True  # built first (a boot proof), not part of the key
    envelope = _envelope_sha256(store.path(dep))
    if envelope:
        annotations["provenanceSha256"] = envelope
    if isinstance(dep, FixedOutput):
        digest = dict(files.get(dep.filename) or {"sha256": dep.sha256, "blake3": dep.blake3})
        mirrors = [public_url(url) for url in dep.urls]
        annotations.update({"size": dep.size, "filename": dep.filename, "mirrors": mirrors,
                            "outputHash": dep_meta["output"]["hash"]})
        descriptor = {"name": name, "uri": mirrors[0] if mirrors else entry_uri(dep.key, dep.store_name),
                      "digest": digest, "annotations": annotations}
    else:
        descriptor = {"name": name, "uri": entry_uri(dep.key, dep.store_name),
                      "digest": {**listing_digest(files), "blake3": dep_meta["output"]["hash"]},
                      "annotations": annotations}
    return descriptor, files


def _local_dependency(name: str, value: Any, recorded: Mapping[str, Any], repository: Path | None
                      ) -> dict[str, Any]:
    """A local file, tree (or a recipe's own local input) as a resolved dependency."""
    path = Path(value.path).absolute()
    kind = str(recorded.get("kind", "local"))
    annotations: dict[str, Any] = {"kind": kind, "input": name, "path": _relative(path, repository)}
    changed = EulerbakeError(f"input {path} changed since the entry was built (its key no longer matches)",
                             hint="rebuild it (doit), then write its provenance")
    if kind == "file":
        digest = file_digests(path)
        if digest["blake3"] != recorded.get("blake3"):
            raise changed
    elif kind == "tree":
        if hashing.hash_tree(path) != recorded.get("blake3"):
            raise changed
        digest = {**listing_digest(tree_digests(path)), "blake3": str(recorded["blake3"])}
    else:  # a recipe's own kind of local input: named by its fingerprint
        digest = {"sha256": hashlib.sha256(hashing.canonical_json(dict(recorded))).hexdigest()}
        if isinstance(recorded.get("blake3"), str):
            digest["blake3"] = recorded["blake3"]
        annotations["fingerprint"] = dict(recorded)
        annotations["digestOf"] = "the fingerprint (canonical JSON), not the files"
    return {"name": name, "uri": path.as_uri(), "digest": digest, "annotations": annotations}


def _code_dependencies(manifest: Mapping[str, Any], repository: Path | None) -> list[dict[str, Any]]:
    """The builder's module and every project module it imports, as recorded in the key."""
    found = []
    for module, recorded in sorted((manifest.get("code") or {}).items()):
        path = module_file(module)
        annotations: dict[str, Any] = {"kind": "code", "module": module}
        digest = {"blake3": recorded}
        uri = f"eulerbake:code/{module}"
        if path is not None:
            uri = path.absolute().as_uri()
            annotations["path"] = _relative(path, repository)
            current = file_digests(path)
            if current["blake3"] == recorded:
                digest["sha256"] = current["sha256"]
            else:
                annotations["changed"] = "the source changed since the build: its sha256 is not known"
        found.append({"name": f"code:{module}", "uri": uri, "digest": digest, "annotations": annotations})
    return found


def _aws_partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def resource_subjects(document: Mapping[str, Any], upstream_files: Mapping[str, Mapping[str, str]]
                      ) -> list[dict[str, Any]]:
    """What a publication made, as subjects: an AMI and its snapshot, a MAAS boot resource.

    An AMI's digest is the sha256 of the disk.raw it was registered from (the snapshot holds exactly those
    bytes; the AMI's `eulerbake:raw-sha256` tag says the same); a MAAS resource's is the sha256 MAAS checked.
    """
    resource = document.get("resource") or {}
    if not isinstance(resource, Mapping):
        return []
    found: list[dict[str, Any]] = []
    if resource.get("image_id"):
        region = str(resource.get("region", ""))
        partition = _aws_partition(region)
        disk = upstream_files.get("disk.raw")
        digest = {"sha256": disk["sha256"], "blake3": disk["blake3"]} if disk else {}
        annotations = {"region": region, "name": resource.get("name", ""), "kind": "aws-ami"}
        found.append({"name": str(resource["image_id"]),
                      "uri": f"arn:{partition}:ec2:{region}::image/{resource['image_id']}",
                      "digest": digest, "annotations": annotations})
        if resource.get("snapshot_id"):
            found.append({"name": str(resource["snapshot_id"]),
                          "uri": f"arn:{partition}:ec2:{region}::snapshot/{resource['snapshot_id']}",
                          "digest": digest, "annotations": {**annotations, "kind": "aws-ebs-snapshot"}})
    elif resource.get("id") is not None and isinstance(resource.get("sha256"), str):
        endpoint = str(resource.get("endpoint", "")).rstrip("/")
        found.append({"name": f"maas:{resource.get('name', resource['id'])}",
                      "uri": f"{endpoint}/api/2.0/boot-resources/{resource['id']}/",
                      "digest": {"sha256": resource["sha256"]},
                      "annotations": {"kind": "maas-boot-resource", "resourceId": resource["id"],
                                      "architecture": resource.get("architecture", ""),
                                      "set": resource.get("set", "")}})
    return [subject for subject in found if subject["digest"]]


def _tool_dependencies(tools: Mapping[str, str]) -> list[dict[str, Any]]:
    found = []
    for tool, version in sorted(tools.items()):
        known = TOOLS.get(tool)
        descriptor: dict[str, Any] = {"name": tool,
                                      "uri": f"pkg:deb/debian/{known.package}" if known else f"eulerbake:tool/{tool}",
                                      "annotations": {"version": version}}
        if version.startswith("blake3:"):
            descriptor["digest"] = {"blake3": version.removeprefix("blake3:")}
        found.append(descriptor)
    return found


def secret_values(secrets: Mapping[str, str] | None = None) -> dict[str, str]:
    """{name: value} of what must never be written: the given secrets and secret-named environment variables."""
    found = {name: value for name, value in (secrets or {}).items() if value}
    for name, value in os.environ.items():
        if SECRET_NAME_RE.search(name) and len(value) >= MIN_SECRET_LENGTH:
            found.setdefault(name, value)
    return found


def check_no_secrets(document: Mapping[str, Any], secrets: Mapping[str, str] | None = None) -> None:
    """Refuse a document holding a secret's value (as is or JSON-escaped); the message names only the variable."""
    text = json.dumps(document, sort_keys=True)
    text += hashing.canonical_json(document).decode()
    leaked = sorted(name for name, value in secret_values(secrets).items()
                    if any(form and form in text for form in secret_forms(value)))
    if leaked:
        raise EulerbakeError(f"the provenance would contain the secret {', '.join(leaked)}; nothing was written",
                             hint="a parameter, target, URL or receipt holds a credential: move it to secrets()")


# -- the statement -----------------------------------------------------------------------------------------


def statement_for(store: Store, node: Node, meta: Mapping[str, Any] | None = None, *, out: Path | None = None,
                  log_file: Path | None = None, repository: Path | None = None,
                  secrets: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The provenance statement of `node`'s entry (its metadata `meta`, read from the store when not given).

    `out`/`log_file` point at an entry being committed (still in `store/.tmp`); `repository` at the recipe
    checkout (default: where the builder's module lives).
    """
    if meta is None:
        if not store.meta_path(node).is_file():
            raise EulerbakeError(f"{node.task_name} is not built (no {store.meta_path(node).name})",
                                 hint=f"build it first: doit {node.task_name}")
        meta = store.read_meta(store.meta_path(node))
    if meta["key"] != node.key:
        raise EulerbakeError(f"the store entry {meta['key']} is not {node.task_name}'s (key {node.key})")
    if meta.get("substituted_from"):
        builders = store.provenance_path(node)
        raise EulerbakeError(f"{node.task_name} was not built here: it came from the cache {meta['substituted_from']}",
                             hint=f"its builder's provenance came with it: {builders}" if builders.is_file() else
                             "the cache entry had no provenance (its builder signed none): set "
                             f"{SIGNING_KEY_ENV} on the runner that builds and pushes")
    fresh = out is not None
    out = out if out is not None else store.path(node)
    if log_file is None and store.log_path(node).is_file():
        log_file = store.log_path(node)
    repository = (repository or repository_of(node)).absolute()
    git = git_dependency(repository)
    top = Path(git["annotations"].get("path", repository))
    manifest: Mapping[str, Any] = meta["manifest"]

    outputs = tree_digests(out, use_cache=not fresh)
    subjects: list[dict[str, Any]] = [{"name": name, "digest": dict(digest)} for name, digest in outputs.items()]
    if not subjects:  # an empty output still needs a subject: the entry itself
        subjects.append({"name": f"{node.key}-{node.store_name}", "digest": listing_digest({})})

    dependencies: list[dict[str, Any]] = []
    upstream_files: dict[str, dict[str, str]] = {}
    recorded_inputs: Mapping[str, Any] = manifest.get("inputs", {})
    for name, value in sorted(getattr(node, "inputs", {}).items()):
        if isinstance(value, Node):
            descriptor, files = _store_dependency(store, name, value)
            dependencies.append(descriptor)
            for relative, digest in files.items():
                upstream_files.setdefault(relative, digest)
        else:
            dependencies.append(_local_dependency(name, value, recorded_inputs[name], top))
    for index, later in enumerate(getattr(node, "after", ())):
        dependencies.append(_store_dependency(store, f"after-{index}", later, after=True)[0])
    if isinstance(node, FixedOutput):  # the pinned URL itself is what a fetch resolves
        mirrors = [public_url(url) for url in node.urls]
        dependencies.append({"name": node.filename,
                             "uri": mirrors[0] if mirrors else f"eulerbake:source/{node.filename}",
                             "digest": {"sha256": node.sha256, "blake3": node.blake3},
                             "annotations": {"kind": "url", "size": node.size, "mirrors": mirrors}})
    dependencies += _code_dependencies(manifest, top)
    dependencies.append(git)

    if node.kind == "publication" and (out / RECEIPT).is_file():
        subjects += resource_subjects(json.loads((out / RECEIPT).read_text()), upstream_files)

    built_at = float(meta.get("built_at") or 0)
    finished = built_at + float(meta.get("build_seconds") or 0)
    built_by = meta.get("built_by") or {}
    host = str(built_by.get("host") or socket.gethostname())
    run_details: dict[str, Any] = {
        "builder": {"id": os.environ.get(BUILDER_ID_ENV) or f"eulerbake:builder/local/{host}",
                    "version": {"eulerbake": str(built_by.get("engine") or __version__)},
                    "builderDependencies": _tool_dependencies(meta.get("tools") or {})},
        "metadata": {"invocationId": node.key, "startedOn": _iso(built_at), "finishedOn": _iso(finished)},
    }
    if log_file is not None and log_file.is_file():
        run_details["byproducts"] = [{"name": "build.log", "uri": f"{entry_uri(node.key, node.store_name)}.log",
                                      "digest": file_digests(log_file, use_cache=False), "mediaType": "text/plain"}]
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": build_type(node.kind),
                "externalParameters": external_parameters(node, manifest),
                "internalParameters": {"key": node.key, "manifest": manifest, "outputHash": meta["output"]["hash"],
                                       "sourceDateEpoch": source_date_epoch(node)},
                "resolvedDependencies": dependencies,
            },
            "runDetails": run_details,
        },
    }
    check_no_secrets(statement, secrets)
    return statement


# -- signing and writing --------------------------------------------------------------------------------


def signing_key_from_env() -> SecretKey | None:
    """The key named by EULERBAKE_SIGNING_KEY_FILE (the cache's signing key), None when unset."""
    path = os.environ.get(SIGNING_KEY_ENV)
    return SecretKey.load(Path(path)) if path else None


def write_provenance(store: Store, node: Node, key: SecretKey | None, *, repository: Path | None = None
                     ) -> tuple[Path, dict[str, Any]]:
    """Sign and write the provenance of `node`'s committed entry beside its metadata; (path, envelope)."""
    envelope = dsse.sign(statement_for(store, node, repository=repository), [key] if key else [])
    path = provenance_path(store.path(node))
    dsse.write(path, envelope)
    return path, envelope


def commit_provenance(store: Store, node: Node, meta: Mapping[str, Any], tmp: Path, *,
                      secrets: Mapping[str, str] | None = None, log_file: Path | None = None) -> Path | None:
    """For `Store.commit`: the signed envelope of the entry in `tmp/out`, written to `tmp/provenance.json`.

    None when no signing key is configured (EULERBAKE_SIGNING_KEY_FILE). The store renames the file to
    `store/<key>-<name>.provenance.json` right after the metadata (never a provenance without its entry).
    """
    key = signing_key_from_env()
    if key is None:
        return None
    envelope = dsse.sign(statement_for(store, node, meta, out=tmp / "out", log_file=log_file, secrets=secrets), [key])
    path = tmp / "provenance.json"
    dsse.write(path, envelope)
    return path
