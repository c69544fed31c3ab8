"""Publication `maas-upload`: the `maas-tgz` root tarball as a MAAS boot resource, through the MAAS 2.0 API.

    maas-upload:<release>:<arch>  maas-tgz → receipt.json {id, name, architecture, sha256, set, endpoint}

The seed ran `maas $PROFILE boot-resources create name=rhel/8 title=… architecture=amd64/generic
content@=openeuler.tar.gz`: one request holding the whole file. Here, as maascli and python-libmaas do for
big files, create then upload: a multipart POST to `/MAAS/api/2.0/boot-resources/` with name, title,
architecture, filetype=tgz, sha256 and size (no content), then PUT of 4 MiB chunks
(`application/octet-stream`, exact Content-Length) to the file's `upload_uri`; MAAS checks the sha256 when
the last byte arrives. Every request is signed OAuth 1.0a PLAINTEXT (oauthlib) with the API key
`consumer_key:token_key:token_secret` (the consumer secret is empty).

- Credentials: EULERBAKE_MAAS_URL + EULERBAKE_MAAS_API_KEY, or a profile in the TOML file
  EULERBAKE_MAAS_PROFILES (default ~/.config/eulerbake/maas.toml: `[<profile>] url = …, api_key = …` or
  `api_key_file = …`; refused when others can read it). The key (and each of its three parts) is a
  secret: masked in logs, never in the store, the receipt or a message. The key of this publication
  covers the tarball's key and the target (profile *name*, resource name, title, architecture), never
  the URL's credentials.
- Idempotent: an uploaded resource with the same name, architecture and a complete file with the
  tarball's sha256 is adopted (`find`); an incomplete one with that sha256 is resumed where MAAS says it
  stopped.
- A failed chunk (dropped connection, timeout, 5xx) is retried after asking MAAS how much it holds: the
  upload goes on from there (the chunk had landed, only the answer was lost), sends the chunk again, or,
  when MAAS's count fits neither, starts over on a fresh resource set. It never ends silently partial:
  the receipt is written only after MAAS reports the file complete with the tarball's sha256.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import stat
import time
import tomllib
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eulerbake.core.derivation import BuildContext, Input
from eulerbake.core.errors import EulerbakeError
from eulerbake.core.publication import Publication

from recipes.publish import Progress

URL_ENV = "EULERBAKE_MAAS_URL"
KEY_ENV = "EULERBAKE_MAAS_API_KEY"
PROFILES_ENV = "EULERBAKE_MAAS_PROFILES"
RETRY_DELAY_ENV = "EULERBAKE_MAAS_RETRY_DELAY"  # seconds before the first retry (doubles each time)
DEFAULT_PROFILES = Path("~/.config/eulerbake/maas.toml")
API_PATH = "/api/2.0/"
CHUNK_SIZE = 4 * 1024 * 1024  # what maascli and python-libmaas send
CHUNK_RETRIES = 5
RESTARTS = 1  # fresh resource sets tried after an upload MAAS cannot resume
TIMEOUT = 120.0
FILETYPE = "tgz"  # the create form's filetype; MAAS files it as "root-tgz"
FILE_KIND = "root-tgz"
TARBALL = "root.tgz"
ARCHITECTURES = {"x86_64": "amd64/generic", "aarch64": "arm64/generic"}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*/[a-z0-9][a-z0-9._-]*$")
SECRET_NAMES = ("api_key", "consumer_key", "token_key", "token_secret")

# Each release as its own `rhel/<x>` boot resource (the seed: "use another rhel/8.x per release"; it used
# rhel/8 for 22.03 LTS and rhel/8.2 for 20.03 LTS SP1). 24.03 follows packer-maas's openeuler template
# (rhel/10). MAAS lists them under "Red Hat Enterprise Linux" with the title below.
RELEASE_NAMES = {
    "20.03-LTS-SP1": "rhel/8.2", "20.03-LTS-SP2": "rhel/8.3", "20.03-LTS-SP3": "rhel/8.4",
    "20.03-LTS-SP4": "rhel/8.5", "22.03-LTS": "rhel/8", "22.03-LTS-SP1": "rhel/8.6", "22.03-LTS-SP2": "rhel/8.7",
    "22.03-LTS-SP3": "rhel/8.8", "22.03-LTS-SP4": "rhel/8.9", "24.03-LTS": "rhel/10", "24.03-LTS-SP1": "rhel/10.1",
    "24.03-LTS-SP2": "rhel/10.2", "24.03-LTS-SP3": "rhel/10.3", "24.03-LTS-SP4": "rhel/10.4",
}  # fmt: skip


def release_name(version: str) -> str:
    """The boot resource name of an openEuler release (`rhel/8`, `rhel/8.2`, …)."""
    if version not in RELEASE_NAMES:
        raise EulerbakeError(f"openEuler {version} has no MAAS boot resource name",
                             hint="add it to RELEASE_NAMES in recipes/publish/maas.py, or pass name='custom/<name>'")
    return RELEASE_NAMES[version]


def release_title(version: str) -> str:
    """`openEuler 22.03 LTS SP4`: what MAAS shows in its image list."""
    return "openEuler " + version.replace("-", " ")


# -- credentials ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    url: str  # MAAS's root, e.g. http://maas.example:5240/MAAS
    consumer_key: str
    token_key: str
    token_secret: str

    def secrets(self) -> dict[str, str]:
        return {"api_key": f"{self.consumer_key}:{self.token_key}:{self.token_secret}",
                "consumer_key": self.consumer_key, "token_key": self.token_key, "token_secret": self.token_secret}


def _split_key(key: str, where: str) -> tuple[str, str, str]:
    parts = key.strip().split(":")
    if len(parts) != 3 or not all(parts):
        raise EulerbakeError(f"the MAAS API key from {where} is not consumer_key:token_key:token_secret",
                             hint="copy it from the MAAS UI (preferences → API keys) or `maas apikey --username U`")
    return parts[0], parts[1], parts[2]


def normalise_url(url: str, where: str) -> str:
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.query or parsed.username:
        raise EulerbakeError(f"the MAAS URL from {where} is not http(s)://host[:port]/MAAS",
                             hint="e.g. http://maas.example:5240/MAAS")
    path = parsed.path.rstrip("/")
    path = path[: -len(API_PATH.rstrip("/"))] if path.endswith(API_PATH.rstrip("/")) else path
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


def load_credentials(profile: str) -> Credentials:
    """The MAAS URL and API key: the environment first, then the profile in the profiles file."""
    env_url, env_key = os.environ.get(URL_ENV, ""), os.environ.get(KEY_ENV, "")
    if env_url and env_key:
        return Credentials(normalise_url(env_url, URL_ENV), *_split_key(env_key, KEY_ENV))
    path = Path(os.environ.get(PROFILES_ENV, "") or DEFAULT_PROFILES).expanduser()
    if not path.is_file():
        raise EulerbakeError(
            f"no MAAS credentials: {URL_ENV}/{KEY_ENV} are not both set and {path} does not exist",
            hint=f"export {URL_ENV}=http://maas:5240/MAAS {KEY_ENV}=<key>, or write [{profile}] url=… api_key=… "
            f"into {path} (mode 0600)")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise EulerbakeError(f"{path} holds MAAS API keys and others can read it", hint=f"chmod 600 {path}")
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise EulerbakeError(f"cannot read the MAAS profiles file {path}: {exc}",
                             hint="write TOML: [<profile>] url = \"…\" api_key = \"…\"") from None
    entry = profiles.get(profile)
    if not isinstance(entry, dict) or "url" not in entry:
        raise EulerbakeError(f"{path} has no MAAS profile [{profile}] with a url",
                             hint=f"profiles there: {', '.join(sorted(profiles)) or 'none'}")
    where = f"{path} [{profile}]"
    if "api_key_file" in entry:
        key_file = Path(str(entry["api_key_file"])).expanduser()
        if not key_file.is_file() or key_file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise EulerbakeError(f"the api_key_file {key_file} of {where} is missing or others can read it",
                                 hint=f"write the key there and chmod 600 {key_file}")
        key = key_file.read_text()
    else:
        key = str(entry.get("api_key", ""))
    return Credentials(normalise_url(env_url or str(entry["url"]), where), *_split_key(env_key or key, where))


# -- the MAAS API ---------------------------------------------------------------------------------------


class Transient(Exception):
    """A request whose outcome is unknown: the connection dropped, timed out, or MAAS answered 5xx."""


class BadRequest(EulerbakeError):
    """MAAS refused a request with 400 (its message says why)."""


@dataclass(frozen=True)
class FileState:
    complete: bool
    progress: float | None  # MAAS's percentage of the file it holds (incomplete files only)
    sha256: str
    size: int
    upload_uri: str


class MaasClient:
    """OAuth-signed requests to one MAAS (a new connection each: a dropped one never poisons the next)."""

    def __init__(self, url: str, secrets: Mapping[str, str], timeout: float = TIMEOUT) -> None:
        self.url = url
        parsed = urllib.parse.urlsplit(url)
        self._https = parsed.scheme == "https"
        self._netloc = parsed.netloc
        self._root = parsed.path
        self._timeout = timeout
        from oauthlib import oauth1  # only when publishing: every doit run imports the recipes

        self._oauth = oauth1.Client(secrets["consumer_key"], client_secret="",
                                    resource_owner_key=secrets["token_key"],
                                    resource_owner_secret=secrets["token_secret"],
                                    signature_method=oauth1.SIGNATURE_PLAINTEXT, realm="OAuth")

    def api(self, path: str) -> str:
        return f"{self._root}{API_PATH}{path}"

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "") -> tuple[int, bytes]:
        """(status, body) of one request to `path` (absolute, on MAAS's host); 401/403 fail at once."""
        _, headers, _ = self._oauth.sign(f"{'https' if self._https else 'http'}://{self._netloc}{path}",
                                         http_method=method)
        headers = {"Authorization": headers["Authorization"], "Accept": "application/json"}
        if body is not None:
            headers["Content-Length"] = str(len(body))
            if content_type:
                headers["Content-Type"] = content_type
        connection: http.client.HTTPConnection
        if self._https:
            connection = http.client.HTTPSConnection(self._netloc, timeout=self._timeout)
        else:
            connection = http.client.HTTPConnection(self._netloc, timeout=self._timeout)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            status, data = response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut mid-answer
            raise Transient(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        finally:
            connection.close()
        if status in (401, 403):
            raise EulerbakeError(
                f"MAAS at {self.url} refused the API key (HTTP {status} on {method} {path}: "
                f"{data.decode(errors='replace').strip()[:200]})",
                hint=f"check {KEY_ENV} or the profile's api_key: a key of a MAAS admin, as "
                "`maas apikey --username <admin>` prints it")
        if status >= 500:
            raise Transient(f"{method} {path}: HTTP {status}: {data.decode(errors='replace').strip()[:200]}")
        if status == 400:
            raise BadRequest(f"MAAS refused {method} {path}: {data.decode(errors='replace').strip()[:300]}")
        return status, data

    def json(self, method: str, path: str, body: bytes | None = None, content_type: str = "") -> Any:
        status, data = self.request(method, path, body, content_type)
        if status == 404:
            return None
        if status not in (200, 201):
            raise EulerbakeError(f"MAAS answered HTTP {status} to {method} {path}: {data[:200]!r}")
        try:
            return json.loads(data)
        except ValueError:
            raise EulerbakeError(f"MAAS answered {method} {path} with no JSON: {data[:200]!r}") from None

    def get(self, path: str, tries: int = 3) -> Any:
        """GET with a few retries (it changes nothing, so repeating it is safe)."""
        for attempt in range(tries):
            try:
                return self.json("GET", path)
            except Transient:
                if attempt + 1 == tries:
                    raise
                time.sleep(_retry_delay() * 2**attempt)
        raise AssertionError("unreachable")


def _retry_delay() -> float:
    try:
        return max(0.0, float(os.environ.get(RETRY_DELAY_ENV, "1")))
    except ValueError:
        return 1.0


def multipart(fields: Mapping[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body of text fields, and its Content-Type."""
    boundary = f"eulerbake-{uuid.uuid4().hex}"
    body = b""
    for name, value in fields.items():
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def file_states(resource: Mapping[str, Any]) -> list[tuple[str, FileState]]:
    """(set version, root-tgz file state) of each set of a boot resource's details."""
    found = []
    for version, resource_set in sorted((resource.get("sets") or {}).items()):
        for entry in (resource_set.get("files") or {}).values():
            if entry.get("filetype") == FILE_KIND:
                progress = entry.get("progress")
                found.append((version, FileState(bool(entry.get("complete")),
                                                 float(progress) if progress is not None else None,
                                                 str(entry.get("sha256", "")), int(entry.get("size", 0)),
                                                 str(entry.get("upload_uri", "")))))
    return found


def held_bytes(state: FileState, candidates: tuple[int, ...]) -> int | None:
    """Which of `candidates` MAAS's percentage stands for (chunks are 4 MiB: they differ by far more than
    the rounding), or None when it fits none of them."""
    if state.progress is None or state.size <= 0:
        return None
    held = state.progress * state.size / 100.0
    matches = [candidate for candidate in candidates if abs(held - candidate) <= max(1.0, state.size * 1e-9)]
    return matches[0] if len(matches) == 1 else None


# -- the publisher ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tarball:
    path: Path
    size: int
    sha256: str


def tarball_of(ctx: BuildContext) -> Tarball:
    path = ctx.inputs["tgz"] / TARBALL
    if not path.is_file():
        raise EulerbakeError(f"{ctx.inputs['tgz']} holds no {TARBALL}", hint="publish the output of the maas-tgz stage")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK_SIZE):
            digest.update(block)
    return Tarball(path, path.stat().st_size, digest.hexdigest())


class RestartUpload(Exception):
    """MAAS's copy cannot be resumed: start again on a fresh resource set."""


class MaasPublisher:
    """Publish a root tarball as an uploaded MAAS boot resource (see the module docstring)."""

    def secrets(self, target: Mapping[str, Any]) -> Mapping[str, str]:
        return load_credentials(str(target["profile"])).secrets()

    def _client(self, target_or_receipt: Mapping[str, Any], secrets: Mapping[str, str]) -> MaasClient:
        return MaasClient(load_credentials(str(target_or_receipt["profile"])).url, secrets)

    def _matching(self, client: MaasClient, target: Mapping[str, Any], tarball: Tarball
                  ) -> list[tuple[dict[str, Any], str, FileState]]:
        """(resource, set version, file) of every uploaded resource with the target's name and architecture
        whose root-tgz file has the tarball's sha256 and size, complete ones first."""
        listed = client.get(client.api("boot-resources/?type=uploaded")) or []
        found = []
        for summary in listed:
            if summary.get("name") != target["name"] or summary.get("architecture") != target["architecture"]:
                continue
            resource = client.get(client.api(f"boot-resources/{summary['id']}/"))
            if resource is None:
                continue
            for version, state in file_states(resource):
                if state.sha256 == tarball.sha256 and state.size == tarball.size:
                    found.append((resource, version, state))
        return sorted(found, key=lambda item: not item[2].complete)

    @staticmethod
    def _receipt(client: MaasClient, target: Mapping[str, Any], resource: Mapping[str, Any], version: str,
                 tarball: Tarball) -> dict[str, Any]:
        return {"id": resource["id"], "name": target["name"], "architecture": target["architecture"],
                "filetype": FILETYPE, "sha256": tarball.sha256, "size": tarball.size, "set": version,
                "endpoint": client.url, "profile": target["profile"]}

    def find(self, ctx: BuildContext, target: Mapping[str, Any]) -> dict[str, Any] | None:
        client = self._client(target, ctx.secrets)
        tarball = tarball_of(ctx)
        for resource, version, state in self._matching(client, target, tarball):
            if state.complete:
                ctx.log(f"maas-upload: {target['name']} ({target['architecture']}) id {resource['id']} already "
                        f"holds sha256 {tarball.sha256[:16]}…")
                return self._receipt(client, target, resource, version, tarball)
        return None

    def create(self, ctx: BuildContext, target: Mapping[str, Any]) -> dict[str, Any]:
        client = self._client(target, ctx.secrets)
        tarball = tarball_of(ctx)
        resume = next(((r, v, s) for r, v, s in self._matching(client, target, tarball) if not s.complete), None)
        for attempt in range(RESTARTS + 1):
            if resume is not None:
                resource, version, state = resume
                ctx.log(f"maas-upload: resuming the incomplete upload of id {resource['id']} (set {version})")
            else:
                resource, version, state = self._create_resource(client, target, tarball, ctx)
            try:
                self._upload(client, resource, version, state, tarball, ctx)
            except RestartUpload as why:
                if attempt == RESTARTS:
                    raise EulerbakeError(f"the upload to {client.url} could not be completed: {why}",
                                         hint="run again: a complete copy is adopted, an incomplete one resumed") \
                        from None
                ctx.log(f"maas-upload: {why}; starting again on a fresh resource set")
                resume = None
                continue
            return self._verified(client, target, resource, version, tarball)
        raise AssertionError("unreachable")

    def _create_resource(self, client: MaasClient, target: Mapping[str, Any], tarball: Tarball, ctx: BuildContext
                         ) -> tuple[dict[str, Any], str, FileState]:
        fields = {"name": str(target["name"]), "title": str(target["title"]),
                  "architecture": str(target["architecture"]), "filetype": FILETYPE,
                  "sha256": tarball.sha256, "size": str(tarball.size)}
        if target.get("base_image"):
            fields["base_image"] = str(target["base_image"])
        body, content_type = multipart(fields)
        try:
            resource = client.json("POST", client.api("boot-resources/"), body, content_type)
        except Transient:
            # The answer was lost, perhaps after MAAS made the set: resume that one rather than make another.
            time.sleep(_retry_delay())
            found = [item for item in self._matching(client, target, tarball) if not item[2].complete]
            if found:
                return found[0]
            resource = client.json("POST", client.api("boot-resources/"), body, content_type)
        states = [(v, s) for v, s in file_states(resource) if s.sha256 == tarball.sha256 and not s.complete]
        if not states:
            raise EulerbakeError(f"MAAS created boot resource {resource.get('id')} but lists no incomplete "
                                 f"{FILE_KIND} file with sha256 {tarball.sha256} to upload to")
        version, state = states[-1]
        ctx.log(f"maas-upload: created {target['name']} ({target['architecture']}) id {resource['id']}, set {version}")
        return resource, version, state

    def _state(self, client: MaasClient, resource_id: Any, version: str) -> FileState | None:
        resource = client.get(client.api(f"boot-resources/{resource_id}/"))
        states = dict(file_states(resource)) if resource is not None else {}
        return states.get(version)

    def _upload(self, client: MaasClient, resource: Mapping[str, Any], version: str, state: FileState,
                tarball: Tarball, ctx: BuildContext) -> None:
        """PUT the chunks from where MAAS stands; retries as the module docstring says."""
        offset = held_bytes(state, tuple(range(0, tarball.size + 1, CHUNK_SIZE))) if state.progress else 0
        if offset is None:
            raise RestartUpload(f"MAAS holds {state.progress}% of the file, not a whole number of chunks")
        uri = state.upload_uri if state.upload_uri.startswith("/") else urllib.parse.urlsplit(state.upload_uri).path
        progress = Progress(ctx.log, f"maas-upload {resource['id']}", tarball.size)
        progress.add(offset)
        failures = 0
        with tarball.path.open("rb") as handle:
            while offset < tarball.size:
                handle.seek(offset)
                chunk = handle.read(CHUNK_SIZE)
                try:
                    client.request("PUT", uri, chunk, "application/octet-stream")
                    offset += len(chunk)
                    progress.add(len(chunk), len(chunk))
                    progress.report(final=offset == tarball.size)
                    failures = 0
                    continue
                except (Transient, BadRequest) as exc:
                    if isinstance(exc, BadRequest) and "Too much data" not in exc.message \
                            and "complete file" not in exc.message:
                        if "SHA256" in exc.message:
                            raise RestartUpload("MAAS found another sha256 in what it received") from None
                        raise
                    failures += 1
                    if failures > CHUNK_RETRIES:
                        raise EulerbakeError(f"chunk at {offset} of {tarball.path.name} failed {failures} times: {exc}",
                                             hint="check the network and MAAS; the next run resumes the upload") \
                            from None
                    ctx.log(f"maas-upload: chunk at {offset} failed ({exc}); asking MAAS how much it holds")
                    time.sleep(_retry_delay() * 2 ** (failures - 1))
                now = self._state(client, resource["id"], version)
                if now is None:
                    raise RestartUpload(f"resource {resource['id']} set {version} is gone")
                if now.complete:
                    if offset + len(chunk) != tarball.size:
                        raise RestartUpload("MAAS marked the file complete before its last chunk")
                    offset = tarball.size
                    break
                held = held_bytes(now, (offset, offset + len(chunk)))
                if held is None:
                    raise RestartUpload(f"MAAS holds {now.progress}% of the file, which fits neither {offset} nor "
                                        f"{offset + len(chunk)} bytes")
                if held != offset:
                    ctx.log(f"maas-upload: the chunk at {offset} had arrived (only the answer was lost)")
                    progress.add(held - offset, held - offset)
                offset = held

    def _verified(self, client: MaasClient, target: Mapping[str, Any], resource: Mapping[str, Any], version: str,
                  tarball: Tarball) -> dict[str, Any]:
        state = self._state(client, resource["id"], version)
        if state is None or not state.complete or state.sha256 != tarball.sha256:
            raise EulerbakeError(f"MAAS does not report boot resource {resource['id']} set {version} complete with "
                                 f"sha256 {tarball.sha256} after the upload; no receipt was written",
                                 hint="run again: the upload is resumed or made anew")
        return self._receipt(client, target, resource, version, tarball)

    def exists(self, receipt: Mapping[str, Any], secrets: Mapping[str, str]) -> bool:
        client = self._client(receipt, secrets)
        if client.url != receipt.get("endpoint"):
            return False  # the profile points at another MAAS now: publish there
        resource = client.get(client.api(f"boot-resources/{receipt['id']}/"))
        if resource is None or resource.get("name") != receipt["name"] \
                or resource.get("architecture") != receipt["architecture"]:
            return False
        return any(state.complete and state.sha256 == receipt["sha256"] for _, state in file_states(resource))

    def remove(self, receipt: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        client = MaasClient(str(receipt["endpoint"]), secrets)
        status, data = client.request("DELETE", client.api(f"boot-resources/{receipt['id']}/"))
        if status not in (200, 204, 404):
            raise EulerbakeError(f"MAAS answered HTTP {status} to deleting boot resource {receipt['id']}: "
                                 f"{data[:200]!r}")


PUBLISHER = MaasPublisher()


def maas_upload(
    label: str,
    tgz: Input,
    *,
    name: str,
    title: str,
    arch: str,
    profile: str = "default",
    base_image: str = "",
    boot_check: Input | None = None,
) -> Publication:
    """Publication `maas-upload:<label>`: `tgz` (a maas-tgz output) as MAAS boot resource `name` for `arch`.
    `name` is `rhel/<x>` (see `release_name`) or `custom/<name>` with a `base_image` such as `rhel/8`.
    `boot_check` (e.g. the boot proof of the disk the tarball was packed from) is built first; the target
    (and so the receipt) says whether there was one."""
    if arch not in ARCHITECTURES:
        raise EulerbakeError(f"unknown architecture {arch!r}", hint=f"use one of {', '.join(ARCHITECTURES)}")
    if not NAME_RE.match(name):
        raise EulerbakeError(f"{name!r} is not a MAAS boot resource name", hint="write <os>/<series>, e.g. rhel/8")
    if name.startswith("custom/") and not base_image:
        raise EulerbakeError(f"custom image {name} needs a base_image", hint="e.g. base_image='rhel/8'")
    if base_image and not NAME_RE.match(base_image):
        raise EulerbakeError(f"{base_image!r} is not a base image name", hint="e.g. rhel/8")
    target: dict[str, Any] = {"profile": profile, "name": name, "title": title, "architecture": ARCHITECTURES[arch],
                              "filetype": FILETYPE, "boot_check": "on" if boot_check is not None else "off"}
    if base_image:
        target["base_image"] = base_image
    inputs: dict[str, Input] = {"tgz": tgz}
    if boot_check is not None:
        inputs["boot_check"] = boot_check
    return Publication(stage="maas-upload", label=label, publisher=PUBLISHER, target=target, inputs=inputs,
                       doc=f"upload the MAAS root tarball as {name} ({ARCHITECTURES[arch]})")

