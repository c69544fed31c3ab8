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
  that contains a secret's value is refused before anything is committed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from eulerbake.core.derivation import ENGINE_ABI, NAME_RE, BuildContext, Input, Node, input_manifest, local_input_files
from eulerbake.core.errors import EulerbakeError

RECEIPT = "receipt.json"
OFFLINE_ENV = "EULERBAKE_OFFLINE"


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
        return [value for value in self.inputs.values() if isinstance(value, Node)]

    def local_files(self) -> list[Path]:
        return local_input_files(self.inputs)

    def secrets(self) -> Mapping[str, str]:
        return self.publisher.secrets(self.target)

    def build(self, ctx: BuildContext) -> None:
        receipt = self.publisher.find(ctx, self.target)
        if receipt is not None:
            ctx.log(f"{self.task_name}: adopting the resource already tagged with key {ctx.key}")
        else:
            receipt = self.publisher.create(ctx, self.target)
        document = {"key": ctx.key, "task": self.task_name, "target": dict(self.target), "resource": receipt}
        (ctx.out / RECEIPT).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")

    def check_output(self, out: Path, secrets: Mapping[str, str]) -> None:
        text = (out / RECEIPT).read_text()
        leaked = sorted(name for name, value in secrets.items() if value and value in text)
        if leaked:
            raise EulerbakeError(
                f"the receipt of {self.task_name} contains the secret {', '.join(leaked)}; nothing was committed",
                hint="the publisher must not copy credentials into what create()/find() return",
            )

    def confirm(self, path: Path) -> bool:
        """Up to date only while the target still has the resource (trusted without asking when offline)."""
        if offline():
            return True
        receipt = read_receipt(path)
        return bool(self.publisher.exists(receipt["resource"], self.secrets()))

    def unpublish(self, path: Path) -> None:
        """Remove the remote resource named by the receipt in `path` (the caller forgets the receipt)."""
        self.publisher.remove(read_receipt(path)["resource"], self.secrets())
