"""`eulerbake cache …`: make signing keys, push what was built, and list, inspect, verify and gc a cache.

Reading a cache needs no key; pushing needs the signing key (EULERBAKE_SIGNING_KEY_FILE or --key) and
write credentials for the cache — on CI, from the main branch only.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from eulerbake.core.derivation import Node, walk
from eulerbake.core.errors import EulerbakeError
from eulerbake.store.signing import SecretKey
from eulerbake.store.substituters import PROVENANCE_DIR, Cache, CacheSettings, PushResult
from eulerbake.tasks.planning import select
from eulerbake.tasks.project import Project, find_project
from eulerbake.tools.units import human_size

console = Console(highlight=False, soft_wrap=True)

USAGE = """\
eulerbake cache keygen NAME [--dir DIR]       write NAME.secret (mode 600) and NAME.public
eulerbake cache push [TASK…] [--all]          upload the tasks' closures (default: the default targets)
eulerbake cache ls [--json]                   list the cache's entries
eulerbake cache info ENTRY [--json]           one entry's metadata (key, key prefix or task name)
eulerbake cache verify [ENTRY…] [--quick]     check signatures, archives and references; --delete the bad
eulerbake cache gc [--older-than DAYS]        delete unreferenced archives and provenance (and entries older than DAYS)
Options: --cache URL (default: push-to or the first substituter), --key FILE (push).
"""


def _project() -> Project | None:
    try:
        return Project(find_project())
    except EulerbakeError:
        return None


def _settings(project: Project | None) -> CacheSettings:
    return CacheSettings.load(project.root if project is not None else None)


def cache_main(argv: Sequence[str], project: Project | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eulerbake cache", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_keygen = sub.add_parser("keygen", help="make an ed25519 signing key pair")
    p_keygen.add_argument("name")
    p_keygen.add_argument("--dir", type=Path, default=Path.cwd())
    p_push = sub.add_parser("push", help="upload store entries (inputs first), signed")
    p_push.add_argument("tasks", nargs="*")
    p_push.add_argument("--all", action="store_true", help="every entry of the store, not the tasks' closures")
    p_push.add_argument("--to", dest="cache", help="the cache URL (default: push-to, or the first substituter)")
    p_push.add_argument("--key", help="the signing key file (default: $EULERBAKE_SIGNING_KEY_FILE)")
    p_push.add_argument("--unsigned", action="store_true", help="push without signing (readers that require "
                        "signatures will refuse these entries)")
    for name, text in (("ls", "list entries"), ("info", "show one entry")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--cache")
        p.add_argument("--json", action="store_true")
        if name == "info":
            p.add_argument("entry")
    p_verify = sub.add_parser("verify", help="check entries (download, hash, unpack; --quick: metadata only)")
    p_verify.add_argument("entries", nargs="*")
    p_verify.add_argument("--cache")
    p_verify.add_argument("--quick", action="store_true")
    p_verify.add_argument("--delete", action="store_true", help="remove the metadata of every bad entry")
    p_gc = sub.add_parser("gc", help="delete what no entry needs")
    p_gc.add_argument("--cache")
    p_gc.add_argument("--older-than", type=float, metavar="DAYS",
                      help="also delete entries not pushed for DAYS days that no newer entry references")
    p_gc.add_argument("--grace", type=float, default=24.0, metavar="HOURS",
                      help="keep unreferenced archives younger than this: a push in flight (default 24)")
    p_gc.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(list(argv))

    if args.command == "keygen":
        key = SecretKey.generate(args.name)
        secret, public = key.write(args.dir)
        console.print(f"wrote {secret} (keep it secret: a CI secret, never in git) and {public}")
        console.print("readers trust it with, in pyproject.toml [tool.eulerbake]:")
        print(f'trusted-public-keys = ["{key.public()}"]')
        return 0
    project = project if project is not None else _project()
    settings = _settings(project)
    if args.command == "push":
        return _push(project, settings, args)
    cache = settings.push_cache(args.cache)
    if args.command == "ls":
        return _ls(cache, args.json)
    if args.command == "info":
        return _info(cache, _resolve(project, cache, args.entry), args.json)
    if args.command == "verify":
        return _verify(cache, project, args)
    return _gc(cache, args)


def _resolve(project: Project | None, cache: Cache, query: str) -> dict[str, Any]:
    """A cache entry by key, key prefix, or task name (the project's key for it, else the cache's record)."""
    if project is not None and ":" in query:
        try:
            node = project.node(query)
        except EulerbakeError:
            node = None
        if node is not None:
            meta = cache.read_entry(node.key)
            if meta is None:
                raise EulerbakeError(f"{cache.url} has no entry for {query} (key {node.key})",
                                     hint=f"build and push it: doit {query} && eulerbake cache push {query}")
            return meta
    return cache.find(query)


def push_nodes(project: Project, cache: Cache, nodes: Sequence[Node], key: SecretKey | None) -> list[PushResult]:
    """Push the closure of `nodes`, inputs first. An input missing from the store is fine when the cache has
    it (it came from there, or the plan cut it); otherwise the push of what needs it says so."""
    store = project.store
    closure = [node for node in walk(list(nodes)) if node.kind != "publication"]
    present = [node for node in closure if store.has(node)]
    held = cache.query([node.key for node in closure])
    metas = [store.read_meta(store.meta_path(node)) for node in present if node.key not in held]
    absent = [node.task_name for node in closure if node.key not in held and not store.has(node)]
    if absent:
        console.print(f"[yellow]not in the store, not pushed:[/] {', '.join(absent)}")
    already = [PushResult(f"{node.key}-{node.store_name}", "present") for node in closure if node.key in held]
    return already + cache.push_all(store, metas, key, log=lambda message: console.print(f"  {message}"))


def _push(project: Project | None, settings: CacheSettings, args: argparse.Namespace) -> int:
    if project is None:
        raise EulerbakeError("cache push needs the project (its store and recipes)",
                             hint="run it from the project directory or set EULERBAKE_PROJECT")
    cache = settings.push_cache(args.cache)
    key = None if args.unsigned else settings.signing_key(args.key)
    if key is None and not args.unsigned:
        raise EulerbakeError("no signing key to sign the entries with",
                             hint="set EULERBAKE_SIGNING_KEY_FILE (or --key FILE) to the NAME.secret file made by "
                             "`eulerbake cache keygen NAME`; pull-request builds do not push")
    started = time.monotonic()
    if args.all:
        store = project.store
        results = cache.push_all(store, store.entries(), key, log=lambda message: console.print(f"  {message}"))
    else:
        default = [node.task_name for node in project.default_targets]
        nodes = select(project.nodes, args.tasks, default)
        if args.tasks and not nodes:
            raise EulerbakeError(f"no task matches {' '.join(args.tasks)}", hint="see `doit list --all`")
        results = push_nodes(project, cache, nodes, key)
    pushed = [r for r in results if r.status == "pushed"]
    console.print(f"[bold]{len(pushed)} pushed[/], {len(results) - len(pushed)} already in {cache.url} "
                  f"({human_size(sum(r.archive_bytes for r in pushed))} in {time.monotonic() - started:.1f}s)")
    return 0


def push_after_build(project: Project, requested: Sequence[str]) -> int:
    """`eulerbake --push …`: after a successful run, push the closure of what was asked for."""
    settings = CacheSettings.load(project.root)
    args = argparse.Namespace(cache=None, key=None, unsigned=False, all=False, tasks=list(requested))
    return _push(project, settings, args)


def _ls(cache: Cache, as_json: bool) -> int:
    listed = cache.listing()
    if as_json:
        print(json.dumps([meta for _item, meta in listed if meta is not None], indent=1, sort_keys=True))
        return 0
    table = Table(show_edge=False, pad_edge=False)
    for column in ("key", "task", "size", "archive", "signed by", "pushed"):
        table.add_column(column, justify="right" if column in ("size", "archive") else "left")
    for item, meta in sorted(listed, key=lambda pair: pair[1]["task"] if pair[1] else ""):
        if meta is None:
            table.add_row(item.name, "[red]unreadable[/]", "-", "-", "-", _age(item.modified))
            continue
        signers = ", ".join(s.partition(":")[0] for s in meta.get("signatures", [])) or "[yellow]unsigned[/]"
        table.add_row(meta["key"], meta["task"], human_size(int(meta["output"]["size"])),
                      human_size(int(meta["archive"]["size"])), signers, _age(item.modified))
    console.print(table)
    console.print(f"{len(listed)} entries in {cache.url}")
    return 0


def _age(modified: float) -> str:
    hours = (time.time() - modified) / 3600
    return f"{hours:.0f}h ago" if hours < 48 else f"{hours / 24:.0f}d ago"


def _info(cache: Cache, meta: dict[str, Any], as_json: bool) -> int:
    try:
        signer = cache.check_signature(meta)
        trust = f"signed by trusted key {signer}" if signer else "[yellow]not verified (signatures not required)[/]"
    except EulerbakeError as err:
        trust = f"[red]{err.message}[/]"
    if as_json:
        print(json.dumps(meta, indent=1, sort_keys=True))
        return 0
    console.print(f"[bold]{meta['task']}[/]  {meta['key']}-{meta['name']}  ({trust})")
    console.print(f"  output   {meta['output']['hash']}  {human_size(int(meta['output']['size']))}")
    console.print(f"  archive  {meta['archive']['hash']}  {human_size(int(meta['archive']['size']))} "
                  f"{meta['archive']['compression']}")
    if isinstance(meta.get("provenance"), dict):
        console.print(f"  provenance {meta['provenance'].get('sha256')}  (its builder's signed envelope)")
    for ref in meta.get("references", []):
        console.print(f"  needs    {ref}")
    for name, value in sorted(meta.get("origin", {}).items()):
        console.print(f"  {name:<8} {json.dumps(value, sort_keys=True)}")
    console.print("  manifest " + json.dumps(meta["manifest"], indent=2, sort_keys=True).replace("\n", "\n  "))
    return 0


def _verify(cache: Cache, project: Project | None, args: argparse.Namespace) -> int:
    if args.entries:
        metas = [_resolve(project, cache, query) for query in args.entries]
    else:
        metas = [meta for _item, meta in cache.listing() if meta is not None]
    work = project.store.root / ".tmp" if project is not None and (project.store.root / ".tmp").is_dir() else None
    problems = cache.verify(metas, deep=not args.quick, work=work)
    for problem in problems:
        console.print(f"[bold red]BAD[/] {problem.label}: {problem.reason}")
    if args.delete:
        for key in sorted({problem.key for problem in problems if problem.key}):
            cache.delete_entry(key)
            console.print(f"removed the metadata of {key} (its archive goes at the next `eulerbake cache gc`)")
    console.print(f"{len(metas)} entries checked in {cache.url}, {len(problems)} problem(s)")
    return 1 if problems and not args.delete else 0


def _gc(cache: Cache, args: argparse.Namespace) -> int:
    older = args.older_than * 86400 if args.older_than is not None else None
    entries, archives = cache.gc(older_than=older, grace=args.grace * 3600, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for name in [*entries, *archives]:
        console.print(f"  {verb} {name}")
    envelopes = sum(1 for name in archives if name.startswith(f"{PROVENANCE_DIR}/"))
    console.print(f"{verb} {len(entries)} entries and {len(archives) - envelopes} archives"
                  + (f" and {envelopes} provenance envelopes" if envelopes else "") + f" from {cache.url}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m eulerbake.cli.cache …` (what `eulerbake cache …` runs): errors are one message, exit 2."""
    import sys

    try:
        return cache_main(list(sys.argv[1:] if argv is None else argv))
    except EulerbakeError as err:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {err}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
