"""Stage `kmod-check`: the kernel-module gate between a built module and the image it goes into.

The gate (`eulerbake.linux.gate`) decides whether the target kernel would load the module, replaying
the kernel's load path in its order: signature, ELF validity (machine/class/byte order, sections inside
the file, a linked module with symbols), vermagic, the `__versions` CRCs against the headers'
Module.symvers, symbol resolution (GPL-only, namespaces), with the image's own modules for the exact
vermagic and module list; a strict policy (default on) also refuses a release mismatch, since modprobe
files modules under /lib/modules/<kver>/. The module under test is never evidence about the kernel:
an image that already carries a module of that name, or a file at `extra/<module>.ko`, is left out of
every lookup. A module the kernel refuses is otherwise only discovered at boot, on a machine nobody can
reach. On pass the output is the overlay `lib/modules/<kver>/extra/<module>.ko` plus `gate-report.json`;
on failure nothing enters the store and the build stops with the gate's reasons and fixes. The gate
runs no tool.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

from eulerbake.core.derivation import BuildContext, Derivation
from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.gate import check_module
from eulerbake.linux.target import KernelTarget

TOOLS: tuple[str, ...] = ()


@dataclass(frozen=True)
class Params:
    module: str  # the module's name: the `ko` input holds <module>.ko
    strict: bool  # also refuse a release mismatch the kernel itself would accept


def _module_of(ko: Derivation) -> str:
    """The module a ko derivation builds, from its params (`module`)."""
    params = ko.params
    module = params.get("module") if isinstance(params, Mapping) else getattr(params, "module", None)
    if not module:
        raise EulerbakeError(f"{ko.task_name} does not say which module it builds (no `module` parameter)",
                             hint="pass module=<name> to kmod_check")
    return str(module)


def kmod_check(label: str, ko: Derivation, headers: Derivation, image_modules: Derivation | None, *,
               strict: bool = True, module: str = "") -> Derivation:
    """Stage `kmod-check:<label>`: gate `ko`'s module against the headers (and the image's own modules)."""
    inputs: dict[str, Derivation] = {"ko": ko, "headers": headers}
    if image_modules is not None:
        inputs["image"] = image_modules
    return Derivation(
        stage="kmod-check",
        label=label,
        builder=build,
        inputs=inputs,
        params=Params(module=module or _module_of(ko), strict=strict),
        tools=TOOLS,
        doc="check the module against the target kernel (pyelftools gate) and lay it out as an overlay",
    )


def build(ctx: BuildContext) -> None:
    """The gate's verdict on the module; on pass, the module laid out as an overlay plus the report."""
    params: Params = ctx.params
    module = params.module
    ko = ctx.inputs["ko"] / f"{module}.ko"
    target = KernelTarget.from_headers(ctx.inputs["headers"] / "build")
    if "image" in ctx.inputs:
        target = target.combine(KernelTarget.from_modules_dir(ctx.inputs["image"]))
    installed_as = f"extra/{ko.name}"
    verdict = check_module(ko, target, strict=params.strict, installed_as=installed_as)
    report = json.dumps(verdict.to_json(), indent=2, sort_keys=True)
    # Store paths differ between stores: name inputs by role so the report is reproducible.
    for role, path in sorted(ctx.inputs.items(), key=lambda item: -len(str(item[1]))):
        report = report.replace(str(path), f"<{role}>")
    if not verdict.passed:
        fixes = verdict.fixes() or ["rebuild the module against the image's own kernel headers"]
        if verdict.kernel_loads is True and params.strict:
            fixes.append("the kernel itself would load it: strict=False accepts the release mismatch")
        raise EulerbakeError(
            f"{module}.ko would not be accepted by kernel {target.release}:\n  " + "\n  ".join(verdict.reasons()),
            hint="; ".join(fixes),
        )
    destination = ctx.out / "lib" / "modules" / target.release / installed_as
    destination.parent.mkdir(parents=True)
    shutil.copyfile(ko, destination)
    (ctx.out / "gate-report.json").write_text(report + "\n")
    ctx.log(f"{module}.ko passes the gate for {target.release}: lib/modules/{target.release}/{installed_as}")
