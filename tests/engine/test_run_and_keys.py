"""The command wrapper's errors and the derivation key's sensitivity."""

from __future__ import annotations

from pathlib import Path

import pytest

from eulerbake.core.derivation import BuildContext, Derivation, FixedOutput, LocalFile
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import Store
from eulerbake.tools import packages
from eulerbake.tools.run import CommandError, run, run_text


def test_missing_tool_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(packages.TOOLS, "no-such-tool-xyz", packages.Tool("xyz-utils"))
    with pytest.raises(EulerbakeError) as err:
        run(["no-such-tool-xyz", "--version"])
    assert "no-such-tool-xyz" in str(err.value) and "apt-get install xyz-utils" in str(err.value)


def test_failing_command_shows_command_and_stderr_tail() -> None:
    with pytest.raises(CommandError) as err:
        run(["sh", "-c", "for i in $(seq 1 100); do echo line$i >&2; done; exit 3"])
    message = str(err.value)
    assert "exit code 3" in message and "sh -c" in message
    assert "line100" in message and "line1\n" not in message  # only the tail


def test_commands_get_a_clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    env = run_text(["env"])
    assert "do-not-leak" not in env and "LC_ALL=C.UTF-8" in env


def noop(ctx: BuildContext) -> None:
    (ctx.out / "x").write_text(ctx.params.get("v", ""))


def other_noop(ctx: BuildContext) -> None:
    (ctx.out / "x").write_text("")


def test_key_depends_on_name_builder_params_and_inputs(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("1")
    base = Derivation("s", "l", noop, {"f": LocalFile(f)}, {"v": "a"})
    assert Derivation("s", "l", noop, {"f": LocalFile(f)}, {"v": "a"}).key == base.key
    assert Derivation("s", "l2", noop, {"f": LocalFile(f)}, {"v": "a"}).key != base.key
    assert Derivation("s", "l", other_noop, {"f": LocalFile(f)}, {"v": "a"}).key != base.key
    assert Derivation("s", "l", noop, {"f": LocalFile(f)}, {"v": "b"}).key != base.key
    f.write_text("2")
    assert Derivation("s", "l", noop, {"f": LocalFile(f)}, {"v": "a"}).key != base.key
    downstream = Derivation("t", "l", noop, {"up": base})
    assert Derivation("t", "l", noop, {"up": Derivation("s", "l", noop, {"f": LocalFile(f)}, {"v": "a"})}).key \
        != downstream.key


def test_builders_must_be_module_level() -> None:
    with pytest.raises(EulerbakeError, match="module-level"):
        _ = Derivation("s", "l", lambda ctx: None).key


def test_missing_local_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EulerbakeError, match="does not exist"):
        _ = Derivation("s", "l", noop, {"f": LocalFile(tmp_path / "missing.patch")}).key


def test_unpinned_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_text("a")
    src = FixedOutput("a.bin", (str(tmp_path / "a.bin"),), "", "", -1, label="x")
    store = Store(tmp_path / "store")
    with pytest.raises(EulerbakeError, match="not pinned") as err:
        store.realise(src)
    assert "eulerbake lock" in str(err.value)
    assert [p for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")] == []


def test_outputs_are_read_only_and_reproducible(tmp_path: Path) -> None:
    drv = Derivation("s", "l", noop, params={"v": "same"})
    one = Store(tmp_path / "a").realise(drv)
    two = Store(tmp_path / "b").realise(drv)
    assert one.built and two.built
    assert (one.path / "x").stat().st_mode & 0o777 == 0o444
    assert (one.path / "x").stat().st_mtime == (two.path / "x").stat().st_mtime
    assert Store(tmp_path / "a").realise(drv).built is False


def test_on_line_streams_stdout_while_the_tool_runs(tmp_path: Path) -> None:
    """The tool waits for a file that only the callback for its first line creates: no streaming, no end."""
    flag = tmp_path / "seen"
    script = f"echo ready; echo to-stderr >&2; while [ ! -e {flag} ]; do sleep 0.05; done; echo done"
    seen: list[str] = []

    def on_line(line: str) -> None:
        seen.append(line)
        if line == "ready":
            flag.touch()

    proc = run(["sh", "-c", script], on_line=on_line, timeout=20)
    assert seen == ["ready", "done"] and proc.stdout == b"ready\ndone\n" and proc.stderr == b"to-stderr\n"
    with pytest.raises(CommandError, match="exit code 3"):
        run(["sh", "-c", "echo partial; exit 3"], on_line=seen.append)


def test_on_line_timeout_stops_the_tool_and_its_children(tmp_path: Path) -> None:
    import time

    started = time.monotonic()
    with pytest.raises(EulerbakeError, match="timed out after 0.5s"):
        run(["sh", "-c", "echo a; sleep 30; echo b"], on_line=lambda _line: None, timeout=0.5)
    assert time.monotonic() - started < 10  # the sleep, holding stdout, was killed with its shell

    def refuse(_line: str) -> None:
        raise RuntimeError("stop")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="stop"):
        run(["sh", "-c", "echo a; sleep 30"], on_line=refuse)
    assert time.monotonic() - started < 10
