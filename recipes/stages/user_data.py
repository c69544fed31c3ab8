"""Stage `user-data`: EC2 user-data that makes an instance of the AMI an RKE2 server or agent.

A `#cloud-config` (not the seed's bare script), rendered from `overlays/cloud-init/rke2.yaml.j2` and
checked with cloud-init's own `cloud-init schema --config-file`: it writes `/etc/rancher/rke2/config.yaml`
(0600), installs a pinned RKE2 (`INSTALL_RKE2_VERSION`, `INSTALL_RKE2_CHANNEL`, the official install script,
tarball method as in the seed), with `-y` for dnf/yum, and enables `rke2-server`/`rke2-agent`.

A join token is a secret: never a parameter, never in the store. An agent (or a server joining a
cluster) either reads it at boot from `token_path`, a file the user puts on the instance by other means
(RKE2's own `token-file` setting), or gets user-data rendered outside the store by
`eulerbake user-data rke2 --token-file F -o user-data.yaml` (`recipes/commands.py`, which uses `render_rke2`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from eulerbake.core.derivation import BuildContext, Derivation, LocalFile
from eulerbake.core.errors import EulerbakeError
from eulerbake.tools.run import CommandError, run

from recipes.stages.render import render

TEMPLATE = Path(__file__).resolve().parents[2] / "overlays" / "cloud-init" / "rke2.yaml.j2"
OUTPUT = "user-data.yaml"
INSTALL_SCRIPT = "https://get.rke2.io"
ROLES = ("server", "agent")
TOOLS = ("cloud-init",)

_VERSION_RE = re.compile(r"^v\d+\.\d+\.\d+\+rke2r\d+$")
_CHANNEL_RE = re.compile(r"^(stable|latest|testing|v\d+\.\d+)$")
_SERVER_RE = re.compile(r"^https://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?/?$")
_PATH_RE = re.compile(r"^(/[A-Za-z0-9._+@-]+)+$")


@dataclass(frozen=True)
class Params:
    role: str
    channel: str
    version: str
    server_url: str  # "" for the first server of a cluster
    token_path: str  # where the instance reads the join token at boot; "" when none


def settings(*, role: str, channel: str, version: str, server_url: str | None, token_path: str | None) -> Params:
    """Checked settings (the token itself is not one of them)."""
    if role not in ROLES:
        raise EulerbakeError(f"unknown RKE2 role {role!r}", hint=f"use one of {', '.join(ROLES)}")
    if not _VERSION_RE.match(version):
        raise EulerbakeError(f"RKE2 version {version!r} is not a release tag",
                             hint="pin a release such as v1.24.4+rke2r1 (github.com/rancher/rke2/releases)")
    if not _CHANNEL_RE.match(channel):
        raise EulerbakeError(f"unknown RKE2 channel {channel!r}", hint="use stable, latest, testing or v1.<minor>")
    if server_url and not _SERVER_RE.match(server_url):
        raise EulerbakeError(f"the RKE2 server URL {server_url!r} is not https://<host>[:port]",
                             hint="the server's supervisor address, e.g. https://10.0.0.10:9345")
    if token_path and not _PATH_RE.match(token_path):
        raise EulerbakeError(f"the token path {token_path!r} is not an absolute path on the instance",
                             hint="e.g. /run/rke2/token (letters, digits and ._+@- only)")
    if role == "agent" and not server_url:
        raise EulerbakeError("an RKE2 agent needs the server to join", hint="give server_url (--server) https://…:9345")
    return Params(role=role, channel=channel, version=version, server_url=server_url or "",
                  token_path=token_path or "")


def check_token(token: str, where: str) -> str:
    """The join token read from `where`: one line of printable characters (a trailing newline is dropped)."""
    value = token.rstrip("\r\n")
    if not value or any(ch < " " or ch == "\x7f" for ch in value):
        raise EulerbakeError(f"{where} does not hold a join token (one non-empty line)",
                             hint="the server writes it to /var/lib/rancher/rke2/server/node-token")
    return value


def render_rke2(template: Path, params: Params, token: str | None = None) -> str:
    """The cloud-config for `params`; `token` only when rendering outside the store."""
    config: list[tuple[str, str]] = []
    if params.server_url:
        config.append(("server", params.server_url))
    if token is not None:
        config.append(("token", token))
    elif params.token_path:
        config.append(("token-file", params.token_path))
    return render(template, {"role": params.role, "channel": params.channel, "version": params.version,
                             "install_script": INSTALL_SCRIPT, "config": config})


def schema_check(path: Path) -> None:
    """cloud-init's own `cloud-init schema --config-file`; its complaint is the error."""
    try:
        run(["cloud-init", "schema", "--config-file", path])
    except CommandError as err:
        raise EulerbakeError(f"cloud-init schema refused {path.name}:\n{err.output_tail.rstrip()}",
                             hint=f"fix {TEMPLATE.name} (or the settings it renders)") from None


def build(ctx: BuildContext) -> None:
    params: Params = ctx.params
    out = ctx.out / OUTPUT
    out.write_text(render_rke2(ctx.inputs["template"], params))
    schema_check(out)
    ctx.log(f"user-data: RKE2 {params.role} {params.version} cloud-config passes cloud-init schema")


def user_data(label: str, *, role: str = "server", channel: str = "stable", version: str,
              server_url: str | None = None, token_path: str | None = None, template: Path = TEMPLATE) -> Derivation:
    """Stage `user-data:<label>`: the RKE2 cloud-config (`user-data.yaml`), with no secret in it."""
    params = settings(role=role, channel=channel, version=version, server_url=server_url, token_path=token_path)
    if params.server_url and not params.token_path:
        raise EulerbakeError(
            f"an RKE2 {role} joining {params.server_url} needs the join token, which never enters the store",
            hint="give token_path (a file the instance reads at boot), or render it outside the store: "
            f"eulerbake user-data rke2 --role {role} --server {params.server_url} --version {version} "
            "--token-file TOKEN -o user-data.yaml",
        )
    return Derivation(
        stage="user-data",
        label=label,
        builder=build,
        inputs={"template": LocalFile(Path(template))},
        params=params,
        tools=TOOLS,
        doc=f"cloud-config: RKE2 {role} {version}" + (f" joining {params.server_url}" if params.server_url else ""),
    )
