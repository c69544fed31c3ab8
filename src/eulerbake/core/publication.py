"""Publications: side effects on a remote service (an AMI, a MAAS boot resource) as nodes of the graph.

A publication's output is a *receipt* (`receipt.json`: what was created, where, its id), committed to the
store like any output. Its key covers its inputs' keys and the *target* (endpoint, account or profile
name, region, resource name) — never a credential and never the publisher's code: improving a publisher
does not publish again. The rules every publisher follows:

- idempotent: `find` looks for a resource already tagged with the key before `create` makes one, so a
  run killed after the remote call adopts what it made instead of making it twice;
- up to date only when the receipt exists *and* `exists` confirms the resource is still there
  (`EULERBAKE_OFFLINE=1` or `eulerbake --offline` trusts the receipt without asking);
- `doit clean` forgets the receipt and never deletes remote things; `eulerbake unpublish TASK` does;
- credentials come from `secrets()` (the standard credential chains) into `ctx.secrets` only: a receipt
  that contains a secret's value (as is or JSON-escaped) is refused before anything is committed, and a
  secret's value in a publisher's log message or exception is masked before it reaches a log or a terminal;
- a publisher's own exception (an unreachable endpoint, a library error) becomes one message naming the
  task and the target, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, TypeVar

from eulerbake.core.derivation import ENGINE_ABI, NAME_RE, BuildContext, Input, Node, input_manifest, local_input_files
from eulerbake.core.errors import EulerbakeError

RECEIPT = "receipt.json"
OFFLINE_ENV = "EULERBAKE_OFFLINE"
MASK = "***"
T = TypeVar("T")


class Publisher(Protocol):
    """What a publisher module-level object offers (see the module docstring for the rules)."""

    def secrets(self, target: Mapping[str, Any]) -> Mapping[str, str]: ...

    def find(self, ctx: BuildContext, target: Mapping[str, Any]) -> dict[str, Any] | None: ...

    def create(self, ctx: BuildContext, target: Mapping[str, Any]) -> dict[str, Any]: ...

    def exists(self, receipt: Mapping[str, Any], secrets: Mapping[str, str]) -> bool: ...

    def remove(self, receipt: Mapping[str, Any], secrets: Mapping[str, str]) -> None: ...


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def read_receipt(path: Path) -> dict[str, Any]:
    """The receipt in a publication's store entry."""
    receipt: dict[str, Any] = json.loads((path / RECEIPT).read_text())
    return receipt


def secret_forms(value: str) -> set[str]:
    """How a secret's value can appear in text the engine keeps: as is, and inside a JSON string."""
    return {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}


def mask(text: str, secrets: Mapping[str, str]) -> str:
    """`text` with every secret's value (in any of its `secret_forms`) replaced by `***`."""
    forms = sorted((form for value in secrets.values() if value for form in secret_forms(value)), key=len, reverse=True)
    for form in forms:
        text = text.replace(form, MASK)
    return text


@dataclass(eq=False)
class Publication(Node):
    """Publish `inputs` to `target` with `publisher`; the output is the receipt."""

    stage: str
    label: str
    publisher: Publisher
    target: Mapping[str, Any]
    inputs: Mapping[str, Input] = field(default_factory=dict)
    name: str = ""
    doc: str = ""
    tools: tuple[str, ...] = ()
    # Nodes that must be realised first without being part of the key (a boot proof): changing how an image
    # is checked must not publish it again. Their output paths are not given to the publisher.
    after: tuple[Node, ...] = ()
    kind = "publication"

    def __post_init__(self) -> None:
        if not self.name:
            self.name = "-".join([self.stage, *self.label.split(":")]) if self.label else self.stage
        if not NAME_RE.match(self.name):
            raise EulerbakeError(f"invalid publication name {self.name!r}", hint="use letters, digits, '._+-'")
        if not self.doc:
            self.doc = f"publish {self.name}"

    @property
    def store_name(self) -> str:
        return self.name

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return {"abi": ENGINE_ABI, "kind": self.kind, "name": self.name, "target": dict(self.target),
                "inputs": input_manifest(self.inputs)}

    def dependencies(self) -> list[Node]:
        return [*(value for value in self.inputs.values() if isinstance(value, Node)), *self.after]

    def local_files(self) -> list[Path]:
        return local_input_files(self.inputs)

    def secrets(self) -> Mapping[str, str]:
        """The publisher's credentials; a credential chain's own exception becomes one message."""
        return self._call("finding the credentials", {}, lambda: self.publisher.secrets(self.target),
                          "configure the credentials the publisher reads (see its secrets())")

    def _call(self, doing: str, secrets: Mapping[str, str], call: Callable[[], T], hint: str) -> T:
        """Run one publisher call; its failure is one EulerbakeError with every secret masked."""
        try:
            return call()
        except EulerbakeError as err:
            raise EulerbakeError(mask(err.message, secrets), hint=mask(err.hint, secrets) if err.hint else None) \
                from None
        except Exception as exc:
            detail = mask(f"{type(exc).__name__}: {exc}", secrets)
            raise EulerbakeError(f"{self.task_name}: {doing} at {self._where()} failed: {detail}", hint=hint) \
                from None

    def _where(self) -> str:
        target = dict(self.target)
        return str(target.get("endpoint") or target.get("region") or target.get("profile") or target)

    def build(self, ctx: BuildContext) -> None:
        secrets = ctx.secrets
        log = ctx.log
        ctx = dataclasses.replace(ctx, log=lambda message: log(mask(message, secrets)))
        retry = "check the target and the credentials; the next run adopts anything already made for this key"
        receipt = self._call("looking for a resource tagged with the key", secrets,
                             lambda: self.publisher.find(ctx, self.target), retry)
        if receipt is not None:
            ctx.log(f"{self.task_name}: adopting the resource already tagged with key {ctx.key}")
        else:
            receipt = self._call("publishing", secrets, lambda: self.publisher.create(ctx, self.target), retry)
        document = {"key": ctx.key, "task": self.task_name, "target": dict(self.target), "resource": receipt}
        (ctx.out / RECEIPT).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")

    def check_output(self, out: Path, secrets: Mapping[str, str]) -> None:
        """Refuse an output any of whose files holds a secret's value, as is or JSON-escaped."""
        forms = {name: [form.encode() for form in secret_forms(value)] for name, value in secrets.items() if value}
        leaked: set[str] = set()
        for path in sorted(out.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            leaked.update(name for name, encoded in forms.items() if any(form in data for form in encoded))
        if leaked:
            raise EulerbakeError(
                f"the receipt of {self.task_name} contains the secret {', '.join(sorted(leaked))}; "
                "nothing was committed",
                hint="the publisher must not copy credentials into what create()/find() return",
            )

    def confirm(self, path: Path) -> bool:
        """Up to date only while the target still has the resource (trusted without asking when offline)."""
        if offline():
            return True
        receipt = read_receipt(path)
        secrets = self.secrets()
        return bool(self._call("asking whether the published resource still exists", secrets,
                               lambda: self.publisher.exists(receipt["resource"], secrets),
                               f"check that the target is reachable and the credentials are valid, or trust the "
                               f"receipt without asking: eulerbake --offline (or {OFFLINE_ENV}=1)"))

    def unpublish(self, path: Path) -> None:
        """Remove the remote resource named by the receipt in `path` (the caller forgets the receipt)."""
        receipt = read_receipt(path)
        secrets = self.secrets()
        self._call("removing the published resource", secrets,
                   lambda: self.publisher.remove(receipt["resource"], secrets),
                   "check that the target is reachable and the credentials are valid; the receipt was kept")
