"""A small project for the engine tests: seven derivations and one source, all local and quick.

graph: template ─┐
       tree ─────┴─ tarball ─ checksum ─┐
       patch file ──────────────────────┴─ combine ── publish (TOY_SERVICE_URL: the toy service)
       other file ── independent
       seed.bin (FixedOutput) ── seeded

Switches the tests set: TOY_FAIL (a failing stage), TOY_STAMP (a stage whose module imports a helper),
TOY_FAKETOOL / TOY_UNDECLARED (stages running external tools), TOY_GOLDEN (the pinned-manifest stages),
TOY_BAD_PARAM (the graph fails to load), TOY_SERVICE_URL / TOY_SERVICE_TOKEN / TOY_RESOURCE /
TOY_LEAK_SECRET / TOY_CREDENTIALS_BROKEN (the publication). The extra stage modules are loaded by
name: the wiring below is not their builders' code (as in the real recipes, whose `__init__` holds
no builder).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import blake3
import jinja2

from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalFile, LocalTree, Node
from eulerbake.core.errors import EulerbakeError
from eulerbake.core.publication import Publication

HERE = Path(__file__).resolve().parent.parent


def render_template(ctx: BuildContext) -> None:
    template = jinja2.Template(Path(ctx.inputs["template"]).read_text())
    (ctx.out / "motd").write_text(template.render(**ctx.params["vars"]))
    _trace("template")


def copy_tree(ctx: BuildContext) -> None:
    for path in sorted(Path(ctx.inputs["tree"]).rglob("*")):
        target = ctx.out / path.relative_to(ctx.inputs["tree"])
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    if os.environ.get("TOY_EDIT_DURING_BUILD"):  # simulates a user saving an input mid-build
        edited = Path(ctx.inputs["tree"]) / "etc/passwd"
        edited.write_text(edited.read_text() + "edited mid-build\n")
    _trace("tree")


def make_tarball(ctx: BuildContext) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tree_files = sorted(p for p in Path(ctx.inputs["tree"]).rglob("*") if p.is_file())
        files = [Path(ctx.inputs["motd"]) / "motd", *tree_files]
        for path in files:
            info = tarfile.TarInfo(path.name if path.name == "motd" else str(path.relative_to(ctx.inputs["tree"])))
            data = path.read_bytes()
            info.size, info.mtime, info.mode = len(data), ctx.source_date_epoch, 0o644
            tar.addfile(info, io.BytesIO(data))
    # Slow writer: the kill tests interrupt it half-way.
    delay = float(os.environ.get("TOY_SLOW", "0"))
    with (ctx.out / "bundle.tar").open("wb") as f:
        data = buffer.getvalue()
        for start in range(0, len(data), 512):
            f.write(data[start : start + 512])
            if delay:
                f.flush()
                time.sleep(delay)
    _trace("tarball")


def write_checksum(ctx: BuildContext) -> None:
    data = (Path(ctx.inputs["tarball"]) / "bundle.tar").read_bytes()
    (ctx.out / "bundle.tar.b3").write_text(blake3.blake3(data).hexdigest() + "  bundle.tar\n")
    _trace("checksum")


def combine(ctx: BuildContext) -> None:
    checksum = (Path(ctx.inputs["checksum"]) / "bundle.tar.b3").read_text()
    patch = Path(ctx.inputs["patch"]).read_text()
    (ctx.out / "release.txt").write_text(f"{ctx.params['title']}\n{checksum}{patch}")
    _trace("combine")


def independent(ctx: BuildContext) -> None:
    (ctx.out / "other.sha256").write_text(hashlib.sha256(Path(ctx.inputs["other"]).read_bytes()).hexdigest())
    _trace("independent")


def seeded(ctx: BuildContext) -> None:
    (ctx.out / "seed.len").write_text(str(Path(ctx.inputs["seed"]).stat().st_size))
    _trace("seeded")


def fail_loudly(ctx: BuildContext) -> None:
    (ctx.out / "partial").write_text("half")
    raise RuntimeError("this builder always fails")


def _trace(name: str) -> None:
    """Append the builder's name to $TOY_TRACE so tests can see exactly which builders ran."""
    trace = os.environ.get("TOY_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(name + "\n")


def _seed_source() -> FixedOutput:
    pins = HERE / "seed.pins"
    sha256, b3, size = pins.read_text().split() if pins.exists() else ("", "", "-1")
    return FixedOutput("seed.bin", (str(HERE / "seed.bin"),), sha256, b3, int(size), label="toy:seed")


class ToyPublisher:
    """Publishes the release to the toy HTTP service (tests/engine/toyservice.py), tagged with the key.

    The token comes from $TOY_SERVICE_TOKEN in `secrets()` only. TOY_LEAK_SECRET makes `create` a careless
    publisher the engine must contain: `1` puts the token into the receipt (refused), `log` into a log
    message and `error` into an exception's message (both masked).
    """

    def secrets(self, target: Mapping[str, Any]) -> Mapping[str, str]:
        if os.environ.get("TOY_CREDENTIALS_BROKEN"):  # a credential chain failing with its library's exception
            raise LookupError("the credential chain found no usable profile")
        token = os.environ.get("TOY_SERVICE_TOKEN", "")
        if not token:
            raise EulerbakeError(f"no token for the toy service at {target['endpoint']}",
                                 hint="set TOY_SERVICE_TOKEN")
        return {"TOY_SERVICE_TOKEN": token}

    @staticmethod
    def _call(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never a proxy
        try:
            with opener.open(request, timeout=10) as response:
                payload = response.read()
                return response.status, json.loads(payload) if payload else None
        except urllib.error.HTTPError as err:
            return err.code, None

    def find(self, ctx: BuildContext, target: Mapping[str, Any]) -> dict[str, Any] | None:
        query = urllib.parse.urlencode({"tag": ctx.key})
        status, found = self._call("GET", f"{target['endpoint']}/resources?{query}", ctx.secrets["TOY_SERVICE_TOKEN"])
        if status != 200:
            raise EulerbakeError(f"the toy service answered {status} to a search")
        return {"id": found[0]["id"], "endpoint": target["endpoint"]} if found else None

    def create(self, ctx: BuildContext, target: Mapping[str, Any]) -> dict[str, Any]:
        token = ctx.secrets["TOY_SERVICE_TOKEN"]
        leak = os.environ.get("TOY_LEAK_SECRET", "")
        if leak == "log":
            ctx.log(f"authenticating to {target['endpoint']} with {token}")
        if leak == "error":
            raise RuntimeError(f"the service did not like the credential {token}")
        digest = hashlib.sha256((Path(ctx.inputs["release"]) / "release.txt").read_bytes()).hexdigest()
        body = {"name": target["resource"], "tag": ctx.key, "digest": digest}
        status, created = self._call("POST", f"{target['endpoint']}/resources", token, body)
        if status != 201:
            raise EulerbakeError(f"the toy service answered {status} to a create")
        receipt = {"id": created["id"], "endpoint": target["endpoint"]}
        if leak == "1":
            receipt["auth"] = f"Bearer {token}"
        _trace("publish")
        return receipt

    def exists(self, receipt: Mapping[str, Any], secrets: Mapping[str, str]) -> bool:
        status, _ = self._call("GET", f"{receipt['endpoint']}/resources/{receipt['id']}", secrets["TOY_SERVICE_TOKEN"])
        if status not in (200, 404):
            raise EulerbakeError(f"the toy service answered {status} when asked for {receipt['id']}")
        return status == 200

    def remove(self, receipt: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        status, _ = self._call("DELETE", f"{receipt['endpoint']}/resources/{receipt['id']}",
                               secrets["TOY_SERVICE_TOKEN"])
        if status not in (204, 404):
            raise EulerbakeError(f"the toy service answered {status} to deleting {receipt['id']}")


publisher = ToyPublisher()


def _stage_module(name: str) -> Any:
    return importlib.import_module(f"recipes.{name}")


def targets() -> list[Node]:
    if os.environ.get("TOY_BAD_PARAM"):
        raise EulerbakeError(f"TOY_BAD_PARAM={os.environ['TOY_BAD_PARAM']!r} is not a valid toy parameter",
                             hint="unset TOY_BAD_PARAM")
    template = Derivation("template", "toy", render_template, {"template": LocalFile(HERE / "templates/motd.j2")},
                          {"vars": {"greeting": os.environ.get("TOY_GREETING", "hello")}})
    tree = Derivation("tree", "toy", copy_tree, {"tree": LocalTree(HERE / "overlay")})
    tarball = Derivation("tarball", "toy", make_tarball, {"motd": template, "tree": tree})
    checksum = Derivation("checksum", "toy", write_checksum, {"tarball": tarball})
    final = Derivation("combine", "toy", combine, {"checksum": checksum, "patch": LocalFile(HERE / "fix.patch")},
                       {"title": "toy release"})
    other = Derivation("independent", "toy", independent, {"other": LocalFile(HERE / "other.txt")})
    result: list[Node] = [final, other]
    if (HERE / "seed.bin").exists():
        result.append(Derivation("seeded", "toy", seeded, {"seed": _seed_source()}))
    if os.environ.get("TOY_FAIL"):
        result.append(Derivation("broken", "toy", fail_loudly, {"tarball": tarball}))
    if os.environ.get("TOY_STAMP"):
        result.append(Derivation("stamp", "toy", _stage_module("stamps").stamp, {"motd": template},
                                 {"title": "stamped"}))
    if os.environ.get("TOY_FAKETOOL"):
        result.append(Derivation("faketool", "toy", _stage_module("tooling").use_faketool, params={"word": "hello"},
                                 tools=("faketool",)))
    if os.environ.get("TOY_UNDECLARED"):
        result.append(Derivation("undeclared", "toy", _stage_module("tooling").use_undeclared))
    if os.environ.get("TOY_GOLDEN"):
        result += _stage_module("golden").golden_targets()
    url = os.environ.get("TOY_SERVICE_URL")
    if url:
        target = {"endpoint": url, "resource": os.environ.get("TOY_RESOURCE", "toy-release")}
        result.append(Publication(stage="publish", label="toy", publisher=publisher, target=target,
                                  inputs={"release": final}))
    return result


def default_targets() -> list[Node]:
    """What a bare `doit` builds: every target but the publication (publishing is asked for by name)."""
    return [node for node in targets() if not isinstance(node, Publication)]
