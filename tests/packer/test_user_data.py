"""Stage `user-data` and `eulerbake user-data rke2`, checked by cloud-init's own `cloud-init schema` (22.4).

The cloud-config for a server and an agent passes the schema; an agent's join token never reaches the
store (the stage has no way to take one; the CLI writes it only to `-o`, mode 0600 whatever the umask);
a token file others can read is refused; same settings give the same bytes under another umask and TZ.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store
from recipes.commands import user_data_main
from recipes.stages.user_data import OUTPUT, user_data

VERSION = "v1.24.4+rke2r1"  # the seed's release
SERVER = "https://10.0.0.10:9345"
TOKEN = "K10e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855::server:s3cr3t-j0in-t0ken"

pytestmark = pytest.mark.skipif(shutil.which("cloud-init") is None,
                                reason="cloud-init (Debian package cloud-init) not installed")
yaml = pytest.importorskip("yaml")


def schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True,
                          timeout=120)


def parsed(path: Path) -> dict[str, Any]:
    text = path.read_text()
    assert text.startswith("#cloud-config\n")  # a cloud-config, not the seed's bare script
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def rke2_config(document: dict[str, Any]) -> dict[str, Any]:
    (entry,) = document["write_files"]
    assert entry["path"] == "/etc/rancher/rke2/config.yaml" and entry["permissions"] == "0600"
    config: dict[str, Any] = yaml.safe_load(entry["content"])
    return config


def files_holding(root: Path, secret: str) -> list[Path]:
    return [path for path in sorted(root.rglob("*")) if path.is_file() and secret.encode() in path.read_bytes()]


def test_server_user_data_installs_the_pinned_rke2_and_passes_cloud_init_schema(tmp_path: Path) -> None:
    out = Store(tmp_path / "store").realise(user_data("rke2", role="server", version=VERSION)).path / OUTPUT
    proc = schema(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = parsed(out)
    assert "write_files" not in document  # a first server needs no config
    commands = document["runcmd"]
    assert commands[0][2].count(" -y install curl tar") == 2  # dnf -y … else yum -y …
    assert commands[1][-1] == "https://get.rke2.io"
    assert commands[2][:5] == ["env", "INSTALL_RKE2_CHANNEL=stable", f"INSTALL_RKE2_VERSION={VERSION}",
                               "INSTALL_RKE2_TYPE=server", "INSTALL_RKE2_METHOD=tar"]
    assert commands[3] == ["systemctl", "enable", "--now", "--no-block", "rke2-server.service"]


def test_agent_user_data_reads_the_token_at_boot_and_passes_cloud_init_schema(tmp_path: Path) -> None:
    node = user_data("agent", role="agent", channel="v1.24", version=VERSION, server_url=SERVER,
                     token_path="/run/rke2/token")
    out = Store(tmp_path / "store").realise(node).path / OUTPUT
    proc = schema(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = parsed(out)
    assert rke2_config(document) == {"server": SERVER, "token-file": "/run/rke2/token"}
    assert "INSTALL_RKE2_TYPE=agent" in document["runcmd"][2] and "INSTALL_RKE2_CHANNEL=v1.24" in document["runcmd"][2]
    assert document["runcmd"][3][-1] == "rke2-agent.service"
    assert "token:" not in out.read_text()


def test_an_agent_without_a_token_source_is_refused_naming_the_cli() -> None:
    with pytest.raises(EulerbakeError, match="needs the join token, which never enters the store") as err:
        user_data("agent", role="agent", version=VERSION, server_url=SERVER)
    assert "eulerbake user-data rke2 --role agent" in str(err.value) and "--token-file" in str(err.value)
    with pytest.raises(EulerbakeError, match="needs the server to join"):
        user_data("agent", role="agent", version=VERSION, token_path="/run/rke2/token")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"role": "worker"}, "unknown RKE2 role"),
    ({"version": "latest"}, "is not a release tag"),
    ({"version": "v1.24.4"}, "is not a release tag"),
    ({"channel": "stable; curl evil"}, "unknown RKE2 channel"),
    ({"server_url": "http://10.0.0.10:9345", "token_path": "/run/t"}, "is not https://"),
    ({"server_url": SERVER, "token_path": "run/token"}, "is not an absolute path"),
])
def test_bad_settings_are_refused(kwargs: dict[str, str], message: str) -> None:
    settings = {"role": "server", "version": VERSION, **kwargs}
    with pytest.raises(EulerbakeError, match=message):
        user_data("x", **settings)  # type: ignore[arg-type]


def test_same_settings_give_the_same_bytes_under_another_umask_and_tz(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def build(store: str) -> Path:
        node = user_data("agent", role="agent", version=VERSION, server_url=SERVER, token_path="/run/rke2/token")
        path: Path = Store(tmp_path / store).realise(node).path
        return path

    first = build("one")
    monkeypatch.setenv("TZ", "America/Sao_Paulo")
    time.tzset()
    previous = os.umask(0o027)
    try:
        second = build("two")
    finally:
        os.umask(previous)
        monkeypatch.undo()
        time.tzset()
    assert first.name == second.name
    assert (first / OUTPUT).read_bytes() == (second / OUTPUT).read_bytes()


# -- eulerbake user-data rke2 (outside the store) ----------------------------------------------


def _token_file(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "node-token"
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    return path


def test_the_cli_writes_the_token_only_to_the_output_with_mode_0600(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    store_root = tmp_path / "store"
    monkeypatch.setenv("EULERBAKE_STORE", str(store_root))
    Store(store_root).realise(user_data("server", role="server", version=VERSION))
    output = tmp_path / "out" / "user-data.yaml"
    output.parent.mkdir()
    previous = os.umask(0)  # the most permissive umask: the file must still be 0600
    try:
        status = user_data_main(["rke2", "--role", "agent", "--server", SERVER, "--version", VERSION,
                                 "--token-file", str(_token_file(tmp_path)), "-o", str(output)])
    finally:
        os.umask(previous)
    assert status == 0
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    proc = schema(output)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rke2_config(parsed(output)) == {"server": SERVER, "token": TOKEN}
    assert sorted(p.name for p in output.parent.iterdir()) == ["user-data.yaml"]  # no partial file left
    assert files_holding(store_root, TOKEN) == []
    assert files_holding(store_root, "s3cr3t-j0in-t0ken") == []
    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err and "mode 0600" in printed.out

    output.chmod(0o644)  # an existing file is replaced, and ends 0600 again
    assert user_data_main(["rke2", "--role", "agent", "--server", SERVER, "--version", VERSION,
                           "--token-path", "/run/rke2/token", "-o", str(output)]) == 0
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    assert rke2_config(parsed(output)) == {"server": SERVER, "token-file": "/run/rke2/token"}


def test_the_cli_refuses_a_world_readable_token_file_and_warns_about_a_group_readable_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "user-data.yaml"
    argv = ["rke2", "--role", "agent", "--server", SERVER, "--version", VERSION, "-o", str(output), "--token-file"]
    with pytest.raises(EulerbakeError, match="readable by every user") as err:
        user_data_main([*argv, str(_token_file(tmp_path, 0o644))])
    assert "chmod 600" in str(err.value) and TOKEN not in str(err.value)
    assert not output.exists()
    assert user_data_main([*argv, str(_token_file(tmp_path, 0o640))]) == 0
    assert "readable by its group" in capsys.readouterr().err


def test_the_cli_refuses_what_would_put_a_token_in_the_store_or_an_agent_without_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_root = tmp_path / "store"
    store_root.mkdir()
    monkeypatch.setenv("EULERBAKE_STORE", str(store_root))
    token = str(_token_file(tmp_path))
    with pytest.raises(EulerbakeError, match="is inside the store"):
        user_data_main(["rke2", "--role", "agent", "--server", SERVER, "--version", VERSION, "--token-file", token,
                        "-o", str(store_root / "user-data.yaml")])
    assert files_holding(store_root, TOKEN) == []
    with pytest.raises(EulerbakeError, match="needs the join token"):
        user_data_main(["rke2", "--role", "agent", "--server", SERVER, "--version", VERSION,
                        "-o", str(tmp_path / "x.yaml")])
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(EulerbakeError, match="does not hold a join token"):
        user_data_main(["rke2", "--role", "agent", "--server", SERVER, "--version", VERSION,
                        "--token-file", str(empty), "-o", str(tmp_path / "x.yaml")])
    with pytest.raises(SystemExit):
        user_data_main(["rke2", "--role", "agent", "--token-file", token, "--token-path", "/run/t",
                        "--version", VERSION, "-o", str(tmp_path / "x.yaml")])


def test_eulerbake_user_data_reaches_the_command_through_recipes_commands(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import recipes
    from eulerbake.cli.main import main
    from recipes import commands

    if "user-data" not in getattr(recipes, "COMMANDS", {}):  # until recipes/__init__.py wires it, exactly so:
        monkeypatch.setattr(recipes, "COMMANDS", {"user-data": commands.user_data_main}, raising=False)

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    output = tmp_path / "server.yaml"
    assert main(["user-data", "rke2", "--role", "server", "--version", VERSION, "-o", str(output)]) == 0
    assert stat.S_IMODE(output.stat().st_mode) == 0o600 and schema(output).returncode == 0
