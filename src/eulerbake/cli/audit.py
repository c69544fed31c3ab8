"""`eulerbake audit`, `eulerbake provenance` and `eulerbake build --check`.

- `audit <ami-id | store path | file | task>`: the provenance chain as a tree, every signature verified
  against the trusted keys (`--trusted-key`, else the cache's `trusted-public-keys`), every local input
  re-hashed; exit 0 when it passes, 1 when it fails, 2 for a query it cannot start from.
- `provenance TASK…`: print the entry's DSSE envelope; with a signing key (`--sign-key FILE` or
  EULERBAKE_SIGNING_KEY_FILE) it is signed and written beside the metadata (`--closure`: also for every
  entry the task was built from that has none yet).
- `build --check [TASK…]`: rebuild each output (default: the default targets and everything they are
  built from) in a fresh store and compare bit for bit; exit 1 when one is not reproducible.

Also runnable as `python -m eulerbake.cli.audit audit|provenance|build …`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from eulerbake.core.derivation import Node, walk
from eulerbake.core.errors import EulerbakeError
from eulerbake.provenance import dsse, provenance_path
from eulerbake.provenance.audit import (
    AMI_RE,
    DRIFT,
    FAIL,
    PASS,
    WARN,
    AuditNode,
    AuditResult,
    audit_ami,
    audit_entry,
    audit_file,
    ec2_client,
    entries_of,
)
from eulerbake.provenance.check import CheckResult, check
from eulerbake.provenance.statement import signing_key_from_env, statement_for, write_provenance
from eulerbake.store.local import Store, default_store_root
from eulerbake.store.signing import PublicKey, SecretKey
from eulerbake.store.substituters import CacheSettings
from eulerbake.tasks.project import Project, find_project

# Not a terminal (CI logs, a pipe): wide enough that no path or digest in the tree is cut.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 240)
errors = Console(stderr=True, highlight=False, soft_wrap=True)
ICONS = {PASS: "[green]✔[/]", WARN: "[yellow]![/]", DRIFT: "[magenta]≠[/]", FAIL: "[bold red]✘[/]"}


def _project() -> Project | None:
    try:
        return Project(find_project())
    except EulerbakeError:
        return None


def _store(project: Project | None) -> Store:
    return project.store if project is not None else Store(default_store_root())


def trusted_keys(values: Sequence[str], project: Project | None) -> list[PublicKey]:
    """--trusted-key values (a key `name:base64`, or a file of them); none given: the cache's trusted keys."""
    keys: list[PublicKey] = []
    for value in values:
        path = Path(value)
        if ":" not in value and path.is_file():
            keys += [PublicKey.parse(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            keys.append(PublicKey.parse(value))
    if not values:
        keys = CacheSettings.load(project.root if project is not None else None).trusted_keys()
    return keys


# -- audit ------------------------------------------------------------------------------------------------


def _entry_meta(project: Project | None, store: Store, query: str) -> dict[str, Any] | None:
    """The entry a query names (a store path, `<key>-<name>`, a key prefix, a task), None when it names a file."""
    path = Path(query)
    if path.exists():
        resolved = path.resolve()
        if resolved.is_dir():
            if resolved.parent == store.root and Path(f"{resolved}.json").is_file():
                return store.read_meta(Path(f"{resolved}.json"))
            raise EulerbakeError(f"{query} is a directory, not a store entry or a file",
                                 hint=f"audit an entry (a path directly under {store.root}), a file, a task or "
                                 "an AMI id")
        return None
    if project is not None and any(node.task_name == query for node in project.nodes):
        node = project.node(query)
        if not store.meta_path(node).is_file():
            raise EulerbakeError(f"{query} is not built (its entry would be {store.path(node).name})",
                                 hint=f"build it first: doit {query}")
        return store.read_meta(store.meta_path(node))
    return store.find(query)


def audit(query: str, *, project: Project | None, trusted: Sequence[PublicKey], allow_drift: bool = False,
          region: str | None = None, endpoint_url: str | None = None) -> AuditResult:
    store = _store(project)
    root = project.root if project is not None else None
    if AMI_RE.match(query):
        return audit_ami(store, query, trusted, ec2=ec2_client(region, endpoint_url), project_root=root,
                         allow_drift=allow_drift)
    meta = _entry_meta(project, store, query)
    if meta is None:
        return audit_file(store, Path(query), trusted, project_root=root, allow_drift=allow_drift)
    return audit_entry(store, meta, trusted, project_root=root, allow_drift=allow_drift, query=query)


def rebuild_entries(result: AuditResult, project: Project | None) -> list[CheckResult]:
    """`--rebuild`: each derivation (and source) of the chain that the current recipes still make, checked."""
    if project is None:
        raise EulerbakeError("--rebuild needs the project the entries were built from",
                             hint="run it in the recipe checkout (or set EULERBAKE_PROJECT)")
    by_key = {node.key: node for node in walk(project.nodes)}
    results = []
    for entry in entries_of(result):
        if entry.info.get("kind") == "publication":
            continue
        node = by_key.get(entry.info["key"])
        if node is None:
            entry.check("rebuild", WARN, "the current recipes do not make this key: it cannot be rebuilt from here")
            continue
        outcome = check(project.store, node, log=lambda message: errors.print(escape(message)))
        entry.check("rebuild", PASS if outcome.ok else FAIL, outcome.summary())
        results.append(outcome)
    return results


def _label(node: AuditNode) -> str:
    text = f"{ICONS[node.status]} [bold]{escape(node.label)}[/]"
    if node.kind == "entry" and node.info.get("key"):
        text += f"  [dim]{node.info['key'][:12]} {escape(str(node.info.get('kind', '')))}[/]"
    else:
        text += f"  [dim]{escape(node.kind)}[/]"
    passed = [c for c in node.checks if c.status == PASS]
    if passed and len(passed) == len(node.checks) and node.kind != "entry":
        text += f"  [dim]— {escape(passed[-1].detail)}[/]"
    elif passed:
        text += f"  [dim]— {escape(', '.join(c.name for c in passed))} ok[/]"
    return text


def render(node: AuditNode, tree: Tree | None = None) -> Tree:
    """The audit as a rich tree: one line per thing, its passed checks summed up, the others spelled out."""
    branch = Tree(_label(node)) if tree is None else tree.add(_label(node))
    for item in node.checks:
        if item.status != PASS:
            branch.add(f"{ICONS[item.status]} {escape(item.name)}: {escape(item.detail)}")
    if node.kind == "entry" and node.info.get("builder"):
        tools = ", ".join(f"{name} ({version})" for name, version in sorted(node.info.get("tools", {}).items()))
        branch.add(f"[dim]built by {escape(str(node.info['builder']))}" + (f" with {escape(tools)}" if tools else "")
                   + "[/]")
    for published in node.info.get("published", []):
        name, uri = escape(str(published.get("name"))), escape(str(published.get("uri")))
        branch.add(f"[cyan]published[/] {name}  [dim]{uri}[/]")
    for child in node.children:
        render(child, branch)
    return branch


def audit_main(argv: Sequence[str], project: Project | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eulerbake audit", description="walk and verify the provenance of an AMI, "
                                     "a store entry, a file or a task")
    parser.add_argument("query", help="ami-…, a store path, a file, a task name or a key prefix")
    parser.add_argument("--json", action="store_true", help="the result as JSON")
    parser.add_argument("--trusted-key", action="append", default=[], metavar="KEY",
                        help="a public key NAME:BASE64 (or a file of them); default: the cache's trusted-public-keys")
    parser.add_argument("--rebuild", action="store_true", help="also rebuild each output and compare bit for bit")
    parser.add_argument("--allow-drift", action="store_true",
                        help="pass even when a local input was edited after the build (still reported)")
    parser.add_argument("--region", help="the AMI's region (default: boto3's: AWS_REGION, the profile)")
    parser.add_argument("--endpoint-url", help="an EC2 endpoint (a test double, a VPC endpoint)")
    args = parser.parse_args(list(argv))
    project = project if project is not None else _project()
    result = audit(args.query, project=project, trusted=trusted_keys(args.trusted_key, project),
                   allow_drift=args.allow_drift, region=args.region, endpoint_url=args.endpoint_url)
    rebuilt = rebuild_entries(result, project) if args.rebuild else []
    if args.json:
        document = result.to_json()
        if args.rebuild:
            document["rebuilt"] = [r.to_json() for r in rebuilt]
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        console.print(render(result.root))
        for outcome in rebuilt:
            if outcome.diffoscope:
                console.print(escape(outcome.diffoscope))
        problems = result.problems()
        if result.ok:
            console.print(f"[green]audit passed[/]: {escape(args.query)}"
                          + (f" ({len(problems)} drift(s) allowed)" if problems else ""))
        else:
            console.print(f"[bold red]audit FAILED[/]: {escape(args.query)}: {len(problems)} problem(s)")
            for line in problems:
                console.print(f"  - {escape(line)}")
    return 0 if result.ok else 1


# -- provenance ---------------------------------------------------------------------------------------------


def provenance_main(argv: Sequence[str], project: Project | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eulerbake provenance", description="print (and with a key, sign and "
                                     "write) the provenance of built tasks")
    parser.add_argument("tasks", nargs="+")
    parser.add_argument("--sign-key", help="the secret key file (default: $EULERBAKE_SIGNING_KEY_FILE)")
    parser.add_argument("--closure", action="store_true",
                        help="also sign every entry the tasks were built from that has no provenance yet")
    parser.add_argument("--force", action="store_true", help="rewrite provenance that exists already")
    parser.add_argument("--output", type=Path, help="also write the (first task's) envelope to this file")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = parser.parse_args(list(argv))
    project = project if project is not None else Project(find_project())
    store = project.store
    key = SecretKey.load(Path(args.sign_key)) if args.sign_key else signing_key_from_env()
    requested = [project.node(task) for task in args.tasks]
    envelopes: list[dict[str, Any]] = []
    if key is not None:
        others = [n for n in walk(requested) if n not in requested] if args.closure else []
        for node in others:
            if not store.has(node) or (provenance_path(store.path(node)).is_file() and not args.force):
                continue
            meta = store.read_meta(store.meta_path(node))
            if meta.get("substituted_from"):
                errors.print(f"[yellow]{escape(node.task_name)}[/]: came from a cache; not signed here (its "
                             "builder's provenance comes with it when the builder signed one)")
                continue
            path, _ = write_provenance(store, node, key)
            if not args.quiet:
                errors.print(f"wrote {path}")
    given = 0  # envelopes as a cache gave them (their builder's)
    for node in requested:
        builders = provenance_path(store.path(node))
        if store.meta_path(node).is_file() and store.read_meta(store.meta_path(node)).get("substituted_from") \
                and builders.is_file():  # its builder's envelope, as the cache gave it: shown, never re-signed
            if not args.quiet:
                errors.print(f"{escape(node.task_name)}: came from a cache; its builder's provenance is {builders}")
            envelopes.append(dsse.read(builders))
            given += 1
            continue
        if key is not None:
            path, envelope = write_provenance(store, node, key)
            if not args.quiet:
                errors.print(f"wrote {path} (signed by {key.name})")
        else:
            envelope = dsse.sign(statement_for(store, node))
        envelopes.append(envelope)
    if key is None and not args.quiet and len(envelopes) > given:
        errors.print("[yellow]unsigned[/]: pass --sign-key FILE (or set EULERBAKE_SIGNING_KEY_FILE) to sign it and "
                     "write it into the store")
    if args.output is not None:
        dsse.write(args.output, envelopes[0])
    if not args.quiet:
        print(json.dumps(envelopes[0] if len(envelopes) == 1 else envelopes, indent=2, sort_keys=True))
    return 0


# -- build --check ------------------------------------------------------------------------------------------


def build_check_main(argv: Sequence[str], project: Project | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eulerbake build --check", description="rebuild outputs in a fresh store "
                                     "and compare them bit for bit with the store's")
    parser.add_argument("--check", action="store_true", required=True)
    parser.add_argument("tasks", nargs="*", help="default: the default targets and everything they are built from")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep each rebuild that differs in DIR")
    args = parser.parse_args(list(argv))
    project = project if project is not None else Project(find_project())
    store = project.store
    nodes: list[Node] = [project.node(task) for task in args.tasks] if args.tasks else \
        [node for node in walk(project.default_targets) if node.kind != "publication"]
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        errors.print(escape(message))

    results: list[CheckResult] = []
    for node in nodes:
        if not store.has(node):
            say(f"{node.task_name} is not built yet: building it first")
            store.realise(node, log=say)
        results.append(check(store, node, log=say, keep=args.keep))
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2, sort_keys=True))
    else:
        for outcome in results:
            console.print(f"{ICONS[PASS if outcome.ok else FAIL]} {escape(outcome.summary())}")
            if outcome.diffoscope:
                console.print(escape(outcome.diffoscope))
    bad = [r for r in results if not r.ok]
    if bad and not args.json:
        console.print(f"[bold red]{len(bad)} of {len(results)} output(s) are not reproducible[/]")
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"audit": audit_main, "provenance": provenance_main, "build": build_check_main}
    if not args or args[0] not in commands:
        errors.print("usage: python -m eulerbake.cli.audit audit|provenance|build --check …")
        return 2
    try:
        return commands[args[0]](args[1:])
    except EulerbakeError as err:
        errors.print(f"[bold red]error:[/] {escape(str(err))}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
