"""The kernel-module gate: would this kernel load this `.ko`? Answered with pyelftools, before an image is built.

A module is read from its ELF sections (`.modinfo` for vermagic/depends/license, `__versions` for the
modversions CRCs, `.symtab` for the symbols it imports). A kernel target is read from a kernel-devel /
headers tree (`include/generated/utsrelease.h`, `.config`, `Module.symvers`), from an installed
`lib/modules/<kver>/` directory (the vermagic of a module shipped there, modules.dep/modules.builtin), or
both. `check_module` replays the checks of the kernel's module loader (Linux 6.1 `kernel/module/`), in
its order and with its wording:

1. `check_modstruct_version`: the CRC of `module_layout` (when the kernel exports it with a CRC);
2. `check_modinfo`: `same_magic()` compares the vermagic strings, *skipping the release part when the
   module has a `__versions` section* (with modversions the CRCs decide, not the release);
3. `simplify_symbols` → `resolve_symbol`: each undefined symbol must be exported (GPL-only exports
   only to GPL-compatible modules, namespaced exports only when imported) with a matching CRC.

That is the *kernel verdict*. On top of it a separate, clearly labelled *policy* (strict by default)
rejects a release mismatch the kernel would tolerate: modprobe and depmod file a module under
/lib/modules/<kver>/, and a module built for another release is a packaging error waiting to happen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.module import GPL_COMPATIBLE, KernelModule, describe_elf, normalise_module_name, read_module
from eulerbake.linux.target import KernelTarget


@dataclass(frozen=True)
class Finding:
    """One check: `status` is ok, fail, warn or unknown; `kernel_line` is what the kernel would print."""

    check: str
    status: str
    message: str
    kernel_line: str = ""


@dataclass
class Verdict:
    """The kernel's verdict (would it load?) and, separately, the strict-release policy's."""

    module: KernelModule
    target: KernelTarget
    kernel: list[Finding]
    policy: list[Finding]
    strict: bool

    @property
    def kernel_loads(self) -> bool | None:
        """True/False as the kernel would decide; None when the evidence cannot settle it."""
        if any(f.status == "fail" for f in self.kernel):
            return False
        if any(f.status == "unknown" for f in self.kernel):
            return None
        return True

    @property
    def kernel_refusal(self) -> str:
        """The first line the kernel would print when refusing ('' when it loads or prints nothing)."""
        return next((f.kernel_line for f in self.kernel if f.status == "fail" and f.kernel_line), "")

    @property
    def policy_ok(self) -> bool:
        return all(f.status != "fail" for f in self.policy)

    @property
    def passed(self) -> bool:
        return self.kernel_loads is True and (self.policy_ok or not self.strict)

    def reasons(self) -> list[str]:
        """Why the gate fails, kernel first, one line each."""
        lines = [f"kernel: {f.message}" for f in self.kernel if f.status in ("fail", "unknown")]
        if self.strict:
            lines += [f"policy (strict): {f.message}" for f in self.policy if f.status == "fail"]
        return lines

    def to_json(self) -> dict[str, Any]:
        def findings(items: list[Finding]) -> list[dict[str, str]]:
            return [{"check": f.check, "status": f.status, "message": f.message, "kernel_line": f.kernel_line}
                    for f in items]

        m = self.module
        return {
            "module": {"path": str(m.path), "name": m.name, "vermagic": m.vermagic, "arch": m.arch,
                       "depends": list(m.depends), "license": m.license, "signed": m.signed,
                       "versions": len(m.versions) if m.versions is not None else None},
            "target": self.target.summary(),
            "kernel": {"loads": self.kernel_loads, "refusal": self.kernel_refusal, "checks": findings(self.kernel)},
            "policy": {"strict": self.strict, "ok": self.policy_ok, "checks": findings(self.policy)},
            "passed": self.passed,
        }


def _check_version(module: KernelModule, target: KernelTarget, symbol: str, crc: int | None,
                   check: str) -> Finding:
    """kernel/module/version.c check_version(), for one symbol."""
    name = module.name
    if crc is None:
        return Finding(check, "ok", f"{symbol}: the kernel exports it without a CRC")
    if module.versions is None:
        hidden = " (its __versions lacks SHF_ALLOC, so the loader ignores it)" if module.versions_unallocated else ""
        if target.force_load:
            return Finding(check, "warn", f"{symbol}: the module has no CRC table{hidden}; "
                           "CONFIG_MODULE_FORCE_LOAD lets it through, tainting the kernel",
                           f"{name}: {symbol}: kernel tainted.")
        return Finding(check, "fail", f"{symbol}: the module has no CRC table{hidden} and the kernel "
                       "has no CONFIG_MODULE_FORCE_LOAD", "")
    if symbol not in module.versions:
        # Upstream only warns here; Debian (and this gate) fail closed, as a missing CRC could hide anything.
        return Finding(check, "fail", f"{symbol}: the module carries no CRC for it",
                       f"{name}: no symbol version for {symbol}")
    if module.versions[symbol] != crc:
        return Finding(check, "fail", f"{symbol}: module CRC 0x{module.versions[symbol]:08x} != kernel CRC "
                       f"0x{crc:08x}", f"{name}: disagrees about version of symbol {symbol}")
    return Finding(check, "ok", f"{symbol}: CRC 0x{crc:08x} matches")


def same_magic(module_magic: str, kernel_magic: str, has_crcs: bool) -> bool:
    """kernel/module/version.c same_magic(): with CRCs the release part (up to the first space) is skipped."""
    if has_crcs:
        module_magic = module_magic[module_magic.find(" "):] if " " in module_magic else ""
        kernel_magic = kernel_magic[kernel_magic.find(" "):] if " " in kernel_magic else ""
    return module_magic == kernel_magic


def check_module(ko: Path | KernelModule, target: KernelTarget, strict: bool = True) -> Verdict:
    """Would `target` load `ko`? Raises EulerbakeError for input that is not a module for this architecture."""
    module = ko if isinstance(ko, KernelModule) else read_module(Path(ko))
    if (module.machine, module.elf_class, module.little_endian) != (target.machine, target.elf_class,
                                                                    target.little_endian):
        raise EulerbakeError(
            f"{module.path} is a {describe_elf(module.machine, module.elf_class, module.little_endian)} module "
            f"({module.arch}) but kernel {target.release} is {target.arch} "
            f"({describe_elf(target.machine, target.elf_class, target.little_endian)})",
            hint="build the module for the target architecture (cross: ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-)",
        )
    name = module.name
    kernel: list[Finding] = [Finding("elf", "ok", f"{module.arch} "
                                     f"({describe_elf(module.machine, module.elf_class, module.little_endian)})")]

    # Symbols in the order the loader meets them: module_layout first (check_modstruct_version).
    imported = [s for s, _weak in module.undefined]
    crcs = target.crcs(["module_layout", *imported])
    if "module_layout" in crcs:
        kernel.append(_check_version(module, target, "module_layout", crcs["module_layout"], "module_layout"))
    elif target.exports is None and target.modversions:
        kernel.append(Finding("module_layout", "unknown", "the CRC of module_layout is unknown (no Module.symvers "
                              "and no shipped module records it)"))

    # check_modinfo(): vermagic.
    has_crcs = module.versions is not None
    if module.vermagic is None:
        if target.force_load:
            kernel.append(Finding("vermagic", "warn", "the module has no vermagic; CONFIG_MODULE_FORCE_LOAD lets it "
                                  "through, tainting the kernel", f"{name}: bad vermagic: kernel tainted."))
        else:
            kernel.append(Finding("vermagic", "fail", "the module has no vermagic"))
    elif same_magic(module.vermagic, target.vermagic, has_crcs):
        note = " (release part skipped: the module has CRCs)" if has_crcs and module.release != target.release else ""
        kernel.append(Finding("vermagic", "ok", f"'{module.vermagic}' matches '{target.vermagic}'{note}"))
    else:
        flags_differ = not same_magic(module.vermagic, target.vermagic, True)
        release_differs = module.release != target.release and not has_crcs
        what = " and ".join(w for w, on in (("release", release_differs), ("flags", flags_differ)) if on)
        kernel.append(Finding("vermagic", "fail", f"{what} differ: module '{module.vermagic}', kernel "
                              f"'{target.vermagic}'", f"{name}: version magic '{module.vermagic}' should be "
                              f"'{target.vermagic}'"))

    # simplify_symbols() → resolve_symbol(): every undefined symbol must be exported, usable and matching.
    gpl_ok = module.license in GPL_COMPATIBLE
    imported_ns = set(module.modinfo.get("import_ns", []))
    symbol_findings: list[Finding] = []
    unknown: list[str] = []
    for symbol, weak in module.undefined:
        export = target.exports.get(symbol) if target.exports is not None else None
        if target.exports is not None and (export is None or (export.gpl_only and not gpl_ok)):
            if weak or (symbol == "_GLOBAL_OFFSET_TABLE_" and target.arch in ("x86_64", "i686")):
                continue
            why = "is not exported by the kernel" if export is None else (
                f"is EXPORT_SYMBOL_GPL and the module's license '{module.license}' is not GPL-compatible")
            symbol_findings.append(Finding("symbols", "fail", f"{symbol} {why}",
                                           f"{name}: Unknown symbol {symbol} (err -2)"))
            continue
        if export is not None and export.namespace and export.namespace not in imported_ns:
            line = f"{name}: module uses symbol ({symbol}) from namespace {export.namespace}, but does not import it."
            status = "warn" if target.missing_namespace_allowed else "fail"
            symbol_findings.append(Finding("symbols", status, f"{symbol} is in namespace {export.namespace}, "
                                           "which the module does not import", line))
        if symbol in crcs:
            finding = _check_version(module, target, symbol, crcs[symbol], "symbols")
            # Without a CRC table the force-load taint is reported once, at module_layout, as the kernel does.
            if finding.status == "fail" or (finding.status == "warn" and module.versions is not None):
                symbol_findings.append(finding)
        elif target.exports is None and target.modversions:
            unknown.append(symbol)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        symbol_findings.append(Finding("symbols", "unknown", f"CRC unknown for {shown}: the target has no "
                                       "Module.symvers and no shipped module imports them"))
    failing = [f for f in symbol_findings if f.status == "fail"]
    if not failing and not unknown:
        how = "with matching CRCs" if module.versions is not None else "(no CRC table to compare)"
        kernel.append(Finding("symbols", "ok", f"{len(imported)} imported symbols exported {how}"))
    kernel.extend(f for f in symbol_findings if f.status != "ok")

    # depends=: modprobe loads these first; a missing one leaves its symbols unresolved.
    if target.modules is not None:
        missing = [d for d in module.depends if normalise_module_name(d) not in target.modules]
        if missing:
            kernel.append(Finding("depends", "fail", f"depends on {', '.join(missing)}, which kernel "
                                  f"{target.release} does not have (its symbols would stay unresolved)"))
        else:
            kernel.append(Finding("depends", "ok", ", ".join(module.depends) or "no dependencies"))

    policy: list[Finding] = []
    if module.release is not None:
        if module.release == target.release:
            policy.append(Finding("release", "ok", f"built for {module.release}, the kernel's release"))
        else:
            policy.append(Finding("release", "fail" if strict else "warn",
                                  f"built for release {module.release} but the kernel is {target.release}"
                                  " (modprobe/depmod file it under /lib/modules/"
                                  f"{target.release}/; build it against that kernel's headers)"))
    return Verdict(module=module, target=target, kernel=kernel, policy=policy, strict=strict)
