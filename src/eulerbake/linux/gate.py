"""The kernel-module gate: would this kernel load this `.ko`? Answered before an image is built.

`check_module` replays Linux 6.1's `load_module()` (`kernel/module/main.c`) in its own order, with
its own messages, and stops where the kernel would stop reading:

1. `module_sig_check` (`linux.signature`): done first, on the raw bytes. Unsigned: loads (tainting)
   unless CONFIG_MODULE_SIG_FORCE; signed by a key the kernel trusts but not matching: EKEYREJECTED;
   signed by an unknown key: loads, tainting; no certificate at hand: "signed, not verifiable here".
2. `elf_validity_check` + `setup_load_info` (`linux.elfcheck`): header, machine/class/byte order as
   the kernel reads them, every section inside the file, a symbol table, `.gnu.linkonce.this_module`.
3. `check_modstruct_version`: the CRC of `module_layout`.
4. `check_modinfo`: `same_magic()` compares the vermagic strings, *skipping the release part when the
   module has a `__versions` section* (with modversions the CRCs decide); the flags part exactly.
5. `check_module_license_and_versions`, then `simplify_symbols` → `resolve_symbol`: each undefined
   symbol exported (by vmlinux, built-ins included, or a module modprobe loads first), GPL-only exports
   only to GPL-compatible modules, namespaced ones only when imported, the CRC matching; an undefined
   *weak* symbol the kernel lacks is fine.
6. `depends=` is only a warning: insmod ignores it, modprobe follows modules.dep (built from symbols).

That is the *kernel verdict*. Where the target's evidence cannot settle a check (no config, CRCs only
from shipped modules), the finding is "unknown" and the verdict "cannot tell", never a guess. On top,
a separate, clearly labelled *policy* (strict by default) rejects a release mismatch the kernel would
tolerate: modprobe and depmod file a module under /lib/modules/<kver>/, and a module built for another
release is a packaging error waiting to happen. Every refusal carries a fix line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eulerbake.linux.elfcheck import (
    MACHINE_BY_NUMBER,
    MACHINE_NUMBERS,
    ElfProblem,
    ElfView,
    describe_elf,
    elf_validity_check,
    setup_load_info,
)
from eulerbake.linux.module import (
    ARCHES,
    CROSS_PREFIXES,
    GPL_COMPATIBLE,
    KernelModule,
    arch_of_elf,
    header_only_module,
    module_bytes,
    normalise_module_name,
    not_a_module,
    own_layout,
    parse_module,
)
from eulerbake.linux.signature import SignatureCheck, module_sig_check
from eulerbake.linux.target import Exclude, Export, KernelTarget

NO_CONFIG = "cannot tell (no config)"
REBUILD = "rebuild the module against the headers of kernel {release} (make -C <headers> M=$PWD modules)"
DAMAGED = "the file is damaged (truncated or corrupted): copy it again from where it was built and compare checksums"


@dataclass(frozen=True)
class Finding:
    """One check: `status` is ok, fail, warn or unknown; `kernel_line` is what the kernel would print."""

    check: str
    status: str
    message: str
    kernel_line: str = ""
    fix: str = ""
    errno: str = ""  # what a refusal returns to insmod (ENOEXEC when not said otherwise)


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
    def refusal(self) -> Finding | None:
        """The first check the kernel fails on, in its own order."""
        return next((f for f in self.kernel if f.status == "fail"), None)

    @property
    def kernel_refusal(self) -> str:
        """The first line the kernel would print when refusing ('' when it loads or prints nothing)."""
        refusal = self.refusal
        return refusal.kernel_line if refusal is not None else ""

    @property
    def errno(self) -> str:
        """The error insmod reports for the refusal ('' when the module loads)."""
        refusal = self.refusal
        return "" if refusal is None else refusal.errno or "ENOEXEC"

    @property
    def cannot_tell(self) -> str:
        """Why the verdict is 'cannot tell' ('' when it is not)."""
        if self.kernel_loads is not None:
            return ""
        unknown = [f for f in self.kernel if f.status == "unknown"]
        if any(f.message.startswith(NO_CONFIG) for f in unknown):
            return "no config"
        return "; ".join(f.message for f in unknown)

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

    def fixes(self) -> list[str]:
        """The fix line of each failing or undecided check, without repeats."""
        chosen = [f for f in self.kernel if f.status in ("fail", "unknown")]
        if self.strict:
            chosen += [f for f in self.policy if f.status == "fail"]
        return list(dict.fromkeys(f.fix for f in chosen if f.fix))

    def to_json(self) -> dict[str, Any]:
        def findings(items: list[Finding]) -> list[dict[str, str]]:
            return [{"check": f.check, "status": f.status, "message": f.message, "kernel_line": f.kernel_line,
                     "fix": f.fix} for f in items]

        m = self.module
        refusal = self.refusal
        signature = next((f for f in self.kernel if f.check == "signature"), None)
        return {
            "module": {"path": str(m.path), "name": m.name, "vermagic": m.vermagic, "arch": m.arch,
                       "depends": list(m.depends), "license": m.license, "signed": m.signed,
                       "signature": signature.message if signature is not None else "",
                       "versions": len(m.versions) if m.versions is not None else None},
            "target": self.target.summary(),
            "kernel": {"loads": self.kernel_loads, "refusal": self.kernel_refusal, "errno": self.errno,
                       "reason": refusal.message if refusal is not None else "", "cannot_tell": self.cannot_tell,
                       "checks": findings(self.kernel)},
            "policy": {"strict": self.strict, "ok": self.policy_ok, "checks": findings(self.policy)},
            "fixes": self.fixes(),
            "passed": self.passed,
        }


# -- fix lines ---------------------------------------------------------------------------------------


def cross_build_hint(module_arch: str, target: KernelTarget) -> str:
    """How to build for the target's arch, from the module's and the kernel's arches."""
    arch = target.arch
    if arch not in ARCHES:
        return f"build the module for the kernel's architecture ({arch})"
    srcarch = ARCHES[arch][3]
    prefix = CROSS_PREFIXES.get(arch, "")
    built_for = f"it was built for {module_arch}; " if module_arch != arch else ""
    return (f"{built_for}build it for {arch} against kernel {target.release}'s headers: make -C <headers> "
            f"M=$PWD ARCH={srcarch} CROSS_COMPILE={prefix} modules (on an {arch} host, without CROSS_COMPILE)")


def _rebuild(target: KernelTarget) -> str:
    return REBUILD.format(release=target.release)


# -- the checks, in the kernel's order ---------------------------------------------------------------


def _signature_finding(sig: SignatureCheck, target: KernelTarget) -> Finding:
    """module_sig_check(): fatal errors always; the non-fatal ones only when signatures are enforced."""
    trust = "scripts/sign-file sha256 <key.pem> <cert.x509> <module> with a key the kernel trusts"
    if sig.status == "verified":
        return Finding("signature", "ok", sig.detail)
    if sig.status == "rejected":
        return Finding("signature", "fail", f"{sig.detail}: refused with EKEYREJECTED ('Key was rejected by "
                       "service')", sig.kernel_line,
                       "use the module exactly as it was signed, or sign it again after the change: " + trust,
                       "EKEYREJECTED")
    if sig.status == "badmsg":
        return Finding("signature", "fail", f"{sig.detail}: refused with EBADMSG even where signatures are not "
                       "enforced", sig.kernel_line,
                       "sign the module again (" + trust + "), or drop the damaged signature (strip --strip-debug "
                       "rewrites the file without it)", "EBADMSG")
    reason = {"unsigned": "unsigned module", "unsupported": "module with unsupported crypto",
              "unknown-key": "module with unavailable key"}.get(sig.status, "")
    taint = "loads, tainting the kernel"
    if sig.status == "unverifiable":
        if target.sig_enforce:
            return Finding("signature", "unknown", f"{sig.detail}, and kernel {target.release} enforces signatures",
                           fix="give the kernel image (--kernel /boot/vmlinuz-<kver>) or --signing-cert CERT")
        return Finding("signature", "warn", f"{sig.detail}: if the kernel trusts that key and the file changed "
                       "after signing, it refuses it (EKEYREJECTED)",
                       fix="give the kernel image (--kernel /boot/vmlinuz-<kver>) or --signing-cert CERT to verify it")
    if target.sig_enforce:
        return Finding("signature", "fail", f"{sig.detail}: kernel {target.release} enforces module signatures "
                       "(CONFIG_MODULE_SIG_FORCE)", f"Loading of {reason} is rejected", "sign it: " + trust,
                       "EKEYREJECTED")
    if target.sig_enforce is None:
        return Finding("signature", "warn", f"{sig.detail}: {NO_CONFIG} whether kernel {target.release} enforces "
                       f"signatures; where it does not, it {taint}")
    return Finding("signature", "ok", f"{sig.detail}" + ("" if sig.status == "unsigned" else f" ({reason})") +
                   f": loads, tainting the kernel (E); kernel {target.release} does not enforce signatures (no "
                   "CONFIG_MODULE_SIG_FORCE, though module.sig_enforce=1 or a Secure Boot lockdown would)",
                   sig.kernel_line)


def _elf_finding(problem: ElfProblem, data: bytes, target: KernelTarget, path: Path) -> Finding:
    """A refusal of the structure: an architecture mismatch says so, plainly, and how to cross-build."""
    own_class, own_le = own_layout(data)
    own_view = ElfView(data, own_class, own_le)
    own_machine = MACHINE_BY_NUMBER.get(own_view.e_machine, f"EM_{own_view.e_machine}")
    own_arch = arch_of_elf(own_machine, own_class, own_le)
    # Another machine, class or byte order shows as one of the header checks (a truncated header is not that).
    header_checks = ("type", "arch", "shentsize") + (("header-len",) if len(data) >= 20 else ())
    if problem.kind in header_checks and (own_machine, own_class, own_le) != (
            target.machine, target.elf_class, target.little_endian):
        described = describe_elf(own_machine, own_class, own_le)
        article = "an" if described[0] in "AEIOUaeioux" else "a"
        return Finding("elf", "fail",
                       f"{path} is {article} {described} module ({own_arch}) but kernel "
                       f"{target.release} is {target.arch} "
                       f"({describe_elf(target.machine, target.elf_class, target.little_endian)}): "
                       f"{problem.message}", problem.kernel_line, cross_build_hint(own_arch, target))
    if problem.kind == "symtab":
        fix = ("do not strip modules with --strip-all: the loader needs the symbol table; strip debug info only "
               "(strip --strip-debug, or make modules_install INSTALL_MOD_STRIP=1)")
    elif problem.kind == "this-module":
        fix = "link it into a module with kbuild: make -C <headers> M=$PWD modules gives <name>.ko (not <name>.o)"
    else:
        fix = DAMAGED
    return Finding("elf", "fail", f"{path.name}: {problem.message}", problem.kernel_line, fix)


def _force_load(target: KernelTarget, check: str, name: str, reason: str, what: str) -> Finding:
    """try_to_force_load(): CONFIG_MODULE_FORCE_LOAD lets it through with a taint, else ENOEXEC (silently)."""
    if target.force_load:
        return Finding(check, "warn", f"{what}; CONFIG_MODULE_FORCE_LOAD lets it through, tainting the kernel",
                       f"{name}: {reason}: kernel tainted.")
    if target.force_load is None:
        return Finding(check, "unknown", f"{NO_CONFIG}: {what}, which only CONFIG_MODULE_FORCE_LOAD lets through",
                       fix="give the kernel config (/boot/config-<kver> in the image, or the headers)")
    return Finding(check, "fail", f"{what}, and the kernel has no CONFIG_MODULE_FORCE_LOAD", "",
                   _rebuild(target) + " so it carries __versions and a vermagic")


def check_version(module: KernelModule, target: KernelTarget, symbol: str, crc: int | None,
                  check: str, errno: str = "ENOEXEC") -> Finding:
    """kernel/module/version.c check_version() (Debian's: a missing symbol version is fatal), for one symbol."""
    name = module.loader_name
    if crc is None:
        return Finding(check, "ok", f"{symbol}: the kernel exports it without a CRC")
    if module.versions is None:
        hidden = " (its __versions lacks SHF_ALLOC, so the loader ignores it)" if module.versions_unallocated else ""
        return _force_load(target, check, module.struct_name or name, symbol,
                           f"{symbol}: the module has no CRC table{hidden}")
    if symbol not in module.versions:
        return Finding(check, "fail", f"{symbol}: the module carries no CRC for it",
                       f"{name}: no symbol version for {symbol}", _rebuild(target), errno)
    if module.versions[symbol] != crc:
        return Finding(check, "fail", f"{symbol}: module CRC 0x{module.versions[symbol]:08x} != kernel CRC "
                       f"0x{crc:08x}: the module was built against another build of the kernel",
                       f"{name}: disagrees about version of symbol {symbol}", _rebuild(target), errno)
    return Finding(check, "ok", f"{symbol}: CRC 0x{crc:08x} matches")


def same_magic(module_magic: str, kernel_magic: str, has_crcs: bool) -> bool:
    """kernel/module/version.c same_magic(): with CRCs the release part (up to the first space) is skipped."""
    if has_crcs:
        module_magic = module_magic[module_magic.find(" "):] if " " in module_magic else ""
        kernel_magic = kernel_magic[kernel_magic.find(" "):] if " " in kernel_magic else ""
    return module_magic == kernel_magic


def flags_difference(module_magic: str, kernel_magic: str) -> str:
    """Which vermagic flag differs, in words: "the module lacks 'modversions'"."""
    mine = [w for w in module_magic.split(" ")[1:] if w]
    theirs = [w for w in kernel_magic.split(" ")[1:] if w]
    parts = []
    missing = [w for w in theirs if w not in mine]
    extra = [w for w in mine if w not in theirs]
    if missing:
        parts.append("the module lacks " + ", ".join(f"'{w}'" for w in missing))
    if extra:
        parts.append("the module has " + ", ".join(f"'{w}'" for w in extra) + " the kernel has not")
    return " and ".join(parts) or "the flags differ in order or spacing"


def _vermagic(module: KernelModule, target: KernelTarget) -> Finding:
    """check_modinfo(): vermagic present and same_magic()."""
    name = module.loader_name
    if module.vermagic is None:
        return _force_load(target, "vermagic", module.struct_name or name, "bad vermagic",
                           "the module has no vermagic")
    if target.vermagic is None:
        return Finding("vermagic", "unknown", "the kernel's vermagic is not known from the sources given",
                       fix="give the kernel headers or the image's modules directory too")
    has_crcs = module.versions is not None
    line = f"{name}: version magic '{module.vermagic}' should be '{target.vermagic}'"
    if same_magic(module.vermagic, target.vermagic, has_crcs):
        note = " (release part skipped: the module has CRCs)" if has_crcs and module.release != target.release else ""
        return Finding("vermagic", "ok", f"'{module.vermagic}' matches '{target.vermagic}'{note}")
    if not same_magic(module.vermagic, target.vermagic, True):
        differ = flags_difference(module.vermagic, target.vermagic)
        return Finding("vermagic", "fail", f"vermagic flags differ: {differ} (module '{module.vermagic}', kernel "
                       f"'{target.vermagic}')", line,
                       f"rebuild the module against kernel {target.release}'s own headers: its .config sets the "
                       "flags (SMP, preempt, mod_unload, modversions)")
    return Finding("vermagic", "fail", f"built for release {module.release}, and without __versions the kernel "
                   f"compares the whole vermagic: module '{module.vermagic}', kernel '{target.vermagic}'", line,
                   _rebuild(target))


def _symbols(module: KernelModule, target: KernelTarget, exports: dict[str, Export | None],
             layout_checked: bool) -> list[Finding]:
    """simplify_symbols() → resolve_symbol() for each symbol, in symbol-table order."""
    name = module.struct_name or module.loader_name
    gpl_ok = module.license in GPL_COMPATIBLE
    imported_ns = set(module.modinfo.get("import_ns", []))
    findings: list[Finding] = []
    unknown: list[str] = []
    via_modules: dict[str, list[str]] = {}
    weak_absent: list[str] = []
    for symbol in module.common:
        findings.append(Finding("symbols", "fail", f"{symbol} is a common symbol",
                                f"{name}: please compile with -fno-common", "compile with -fno-common (kbuild does)"))
    for symbol, index in module.bad_shndx:
        findings.append(Finding("symbols", "fail", f"{symbol} points at section {index}, which does not exist",
                                f"{name}: Symbol {symbol} has an invalid section index {index} "
                                f"(max {module.shnum - 1})", DAMAGED))
    for symbol, weak in module.undefined:
        ignored = symbol == "_GLOBAL_OFFSET_TABLE_" and target.arch in ("x86_64", "i686")
        if symbol not in exports:
            if weak:
                weak_absent.append(symbol)
            elif not ignored:
                unknown.append(symbol)
            continue
        export = exports[symbol]
        if export is not None and export.gpl_only is None and not gpl_ok:
            findings.append(Finding("symbols", "unknown", f"cannot tell whether {symbol} is EXPORT_SYMBOL_GPL (no "
                                    f"export table; the module's license is '{module.license}')",
                                    fix="give the kernel headers or the kernel image (--kernel /boot/vmlinuz-<kver>)"))
            continue
        if export is None or (export.gpl_only and not gpl_ok):
            if weak or ignored:
                if weak:
                    weak_absent.append(symbol)
                continue
            if export is None:
                why = f"is not exported by kernel {target.release}"
                fix = (f"{symbol} is missing from kernel {target.release}: build the module from source that "
                       "matches this kernel's API, or install the module that exports it")
            else:
                why = (f"is EXPORT_SYMBOL_GPL and the module's license '{module.license}' is not GPL-compatible")
                fix = (f"only GPL-compatible modules may use {symbol}: MODULE_LICENSE(\"GPL\") (or \"Dual BSD/GPL\", "
                       "\"Dual MIT/GPL\"), or stop using it")
            findings.append(Finding("symbols", "fail", f"{symbol} {why}", f"{name}: Unknown symbol {symbol} (err -2)",
                                    fix, "ENOENT"))
            continue
        version = check_version(module, target, symbol, export.crc, "symbols", "EINVAL")
        # Without a CRC table, try_to_force_load() speaks once: at module_layout, when that was checked.
        if version.status != "ok" and (module.versions is not None or not layout_checked):
            findings.append(version)
        if version.status == "fail":
            continue
        namespace_finding = _namespace(module, target, symbol, export, imported_ns, name)
        if namespace_finding is not None:
            findings.append(namespace_finding)
            if namespace_finding.status == "fail":
                continue
        if export.owner not in ("vmlinux", "?"):
            if target.modules is not None and normalise_module_name(export.owner) not in target.modules:
                findings.append(Finding("symbols", "fail", f"{symbol} is exported by module {export.owner}, which "
                                        f"kernel {target.release}'s modules do not include",
                                        f"{name}: Unknown symbol {symbol} (err -2)",
                                        f"install module {export.owner} in the image too", "ENOENT"))
                continue
            via_modules.setdefault(export.owner, []).append(symbol)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        findings.append(Finding("symbols", "unknown", f"cannot tell whether kernel {target.release} exports {shown} "
                                "(or with which CRC): no export table, and no shipped module imports them",
                                fix="give the kernel headers (--kernel /lib/modules/<kver>/build) or the kernel "
                                "image (--kernel /boot/vmlinuz-<kver>)"))
    if not any(f.status in ("fail", "unknown") for f in findings):
        how = "with matching CRCs" if module.versions is not None else "(no CRC table to compare)"
        notes = [f"{len(module.undefined)} imported symbols resolve {how}"]
        if via_modules:
            notes.append("exported by " + ", ".join(f"{owner} ({len(s)})" for owner, s in sorted(via_modules.items()))
                         + ": modprobe loads those first (modules.dep), insmod alone would not")
        if weak_absent:
            notes.append("weak, left NULL where the kernel lacks them: " + ", ".join(weak_absent[:5]))
        findings.insert(0, Finding("symbols", "ok", "; ".join(notes)))
    return findings


def _namespace(module: KernelModule, target: KernelTarget, symbol: str, export: Export, imported: set[str],
               name: str) -> Finding | None:
    """verify_namespace_is_imported()."""
    if export.namespace is None:
        possible = export.possible_namespaces or frozenset({""})
        if possible <= {"", *imported}:
            return None
        return Finding("symbols", "unknown", f"cannot tell which namespace {symbol} is in (maybe "
                       f"{', '.join(sorted(n for n in possible if n))}), and the module imports "
                       f"{', '.join(sorted(imported)) or 'none'}",
                       fix="give the kernel headers or the kernel image (--kernel /boot/vmlinuz-<kver>)")
    if not export.namespace or export.namespace in imported:
        return None
    line = f"{name}: module uses symbol ({symbol}) from namespace {export.namespace}, but does not import it."
    fix = f"add MODULE_IMPORT_NS({export.namespace}); to the module's source"
    if target.missing_namespace_allowed:
        return Finding("symbols", "warn", f"{symbol} is in namespace {export.namespace}, which the module does not "
                       "import (CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS lets it through)", line, fix)
    if target.missing_namespace_allowed is None:
        return Finding("symbols", "unknown", f"{NO_CONFIG}: {symbol} is in namespace {export.namespace}, which the "
                       "module does not import", line, fix)
    return Finding("symbols", "fail", f"{symbol} is in namespace {export.namespace}, which the module does not import",
                   line, fix, "EINVAL")


def _depends(module: KernelModule, target: KernelTarget) -> Finding:
    """depends=: never a refusal (insmod ignores it); a warning when it names a module the kernel lacks."""
    if not module.depends:
        return Finding("depends", "ok", "no dependencies")
    if target.modules is None:
        return Finding("depends", "ok", ", ".join(module.depends) + " (the kernel's module list is not known)")
    builtin = target.builtin or frozenset()
    missing = [d for d in module.depends if normalise_module_name(d) not in target.modules]
    inside = [d for d in module.depends if normalise_module_name(d) in builtin]
    if missing:
        complete = any(s.get("read_as", s["kind"]) == "modules-dir" for s in target.sources)
        known = "does not have" if complete else "is not known to have (only exporting modules are listed)"
        return Finding("depends", "warn", f"depends= names {', '.join(missing)}, which kernel {target.release} "
                       f"{known}: the kernel ignores depends= and modprobe follows modules.dep (built by depmod from "
                       "symbols), so this only misleads tools that read depends=",
                       fix="rebuild the module against the kernel's headers so modpost writes the real depends=")
    note = f" ({', '.join(inside)} built into the kernel)" if inside else ""
    return Finding("depends", "ok", ", ".join(module.depends) + note + ": modprobe loads them first")


def _taints(module: KernelModule, signature: SignatureCheck) -> Finding | None:
    taints = []
    if signature.status not in ("verified",):
        taints.append("unsigned or unverified (E)")
    if "intree" not in module.modinfo:
        taints.append("out-of-tree (O)")
    if module.license not in GPL_COMPATIBLE:
        taints.append(f"license '{module.license}' (P)")
    if "staging" in module.modinfo:
        taints.append("staging (C)")
    if not taints:
        return None
    return Finding("taint", "ok", "loads tainting the kernel: " + ", ".join(taints))


def check_module(ko: Path | KernelModule, target: KernelTarget, strict: bool = True,
                 installed_as: str | None = None) -> Verdict:
    """Would `target` load `ko`? `installed_as` (e.g. 'extra/ena.ko') is where it goes in lib/modules/<kver>.

    Raises EulerbakeError only for input that is no relocatable ELF object at all (a wrong file); any
    damage to a module becomes the kernel's refusal.
    """
    path = ko.path if isinstance(ko, KernelModule) else Path(ko)
    data = module_bytes(path)
    error = not_a_module(path, data)
    if error is not None:
        raise error
    kernel: list[Finding] = []
    add = kernel.append

    def verdict(module: KernelModule) -> Verdict:
        return Verdict(module=module, target=target, kernel=kernel, policy=_policy(module, target, strict),
                       strict=strict)

    signature = module_sig_check(data, target.certificates)
    add(_signature_finding(signature, target))
    content = data[: signature.length]
    machine = MACHINE_NUMBERS.get(target.machine)
    problem = elf_validity_check(content, target.elf_class, target.little_endian, machine)
    if problem is not None:
        add(_elf_finding(problem, content, target, path))
        return verdict(header_only_module(path, data))
    module = parse_module(path, content, target.elf_class, target.little_endian, signed=signature.signed)
    problem = setup_load_info(ElfView(content, target.elf_class, target.little_endian), module.modinfo_name)
    if problem is not None:
        add(_elf_finding(problem, content, target, path))
        return verdict(module)
    add(Finding("elf", "ok", f"{module.arch} ({describe_elf(module.machine, module.elf_class, module.little_endian)})"
                f", {module.shnum} sections inside the file, linked (.gnu.linkonce.this_module), with symbols"))

    exclude = Exclude.module(module, installed_as)
    wanted = [symbol for symbol, _weak in module.undefined]
    exports = target.lookup(["module_layout", *wanted] if target.modversions else wanted, exclude)

    # check_modstruct_version(): a stub without CONFIG_MODVERSIONS (and gone from kernels without module_layout).
    layout = exports.get("module_layout")
    layout_checked = target.modversions and layout is not None
    if target.modversions:
        if layout is not None:
            add(check_version(module, target, "module_layout", layout.crc, "module_layout"))
        elif "module_layout" not in exports:
            add(Finding("module_layout", "unknown", "the CRC of module_layout is unknown (no Module.symvers, no "
                        "kernel image, and no shipped module records it)",
                        fix="give the kernel headers or the kernel image (--kernel /boot/vmlinuz-<kver>)"))

    add(_vermagic(module, target))
    if module.exports_without_crcs and target.modversions:
        add(_force_load(target, "exports", module.struct_name or module.loader_name,
                        "no versions for exported symbols", "the module exports symbols without CRCs"))
    for finding in _symbols(module, target, exports, layout_checked):
        add(finding)
    add(_depends(module, target))
    taint = _taints(module, signature)
    if taint is not None:
        add(taint)
    return verdict(module)


def _policy(module: KernelModule, target: KernelTarget, strict: bool) -> list[Finding]:
    """The strict-release policy: on top of the kernel's rule, and labelled as such."""
    if module.release is None:
        return []
    if module.release == target.release:
        return [Finding("release", "ok", f"built for {module.release}, the kernel's release")]
    return [Finding("release", "fail" if strict else "warn",
                    f"built for release {module.release} but the kernel is {target.release} (modprobe/depmod file it "
                    f"under /lib/modules/{target.release}/; build it against that kernel's headers)",
                    fix=f"rebuild against kernel {target.release}'s headers, or accept the release mismatch the kernel "
                    "itself accepts (--no-strict, strict=False)")]
