"""A kernel target: what a kernel exports, expects and trusts, read from the places a kernel is described.

- a headers tree (`include/generated/utsrelease.h`, `.config`, `Module.symvers`: everything exported, with
  CRCs, GPL-only flags and namespaces — but of the installed modules only the exporting ones);
- an installed `lib/modules/<kver>/` directory, read as one (its `build` symlink only when given itself):
  the exact vermagic its modules carry, modules.dep/modules.builtin, a shipped symvers.gz when there is
  one, the config in /boot or beside the modules, and otherwise what its modules know: the exports of
  each module (their own `__ksymtab`) and the CRCs they recorded of the symbols they import;
- a kernel image (`linux.kimage`): release, vermagic, trusted certificates, vmlinux's export table.

`combine` merges several of them; `origin` says, for each fact, which one it came from. A module under
test never serves as evidence about the kernel: lookups exclude modules of its name and install path.
"""

from __future__ import annotations

import gzip
import lzma
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eulerbake.core.errors import EulerbakeError
from eulerbake.linux.module import (
    ARCHES,
    GPL_COMPATIBLE,
    MODULE_SUFFIXES,
    KernelModule,
    normalise_module_name,
    read_module,
)


@dataclass(frozen=True)
class Export:
    """One exported kernel symbol. `gpl_only`/`namespace` are None when only inferred evidence exists."""

    crc: int | None
    owner: str  # "vmlinux" or the module's name
    gpl_only: bool | None = False
    namespace: str | None = ""
    possible_namespaces: frozenset[str] | None = None  # evidence: the namespaces it may be in ("" = none)


def parse_module_symvers(text: str) -> dict[str, Export]:
    """Module.symvers: `0xCRC<TAB>symbol<TAB>module[<TAB>EXPORT_SYMBOL[_GPL][<TAB>namespace]]`."""
    exports: dict[str, Export] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or not fields[0].startswith("0x"):
            continue
        try:
            crc = int(fields[0], 16)
        except ValueError:
            continue
        owner = fields[2]
        owner = "vmlinux" if owner == "vmlinux" else normalise_module_name(owner.rsplit("/", 1)[-1])
        gpl_only = len(fields) > 3 and fields[3].endswith("_GPL")
        namespace = fields[4].strip() if len(fields) > 4 else ""
        # An all-zero CRC is what modpost writes for a kernel built without modversions.
        exports[fields[1]] = Export(crc=crc or None, owner=owner, gpl_only=gpl_only, namespace=namespace)
    return exports


def read_text_maybe_compressed(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(b"\x1f\x8b"):
        raw = gzip.decompress(raw)
    elif raw.startswith(b"\xfd7zXZ\0"):
        raw = lzma.decompress(raw)
    return raw.decode(errors="replace")


def parse_kconfig(text: str) -> dict[str, str]:
    """`CONFIG_FOO=y` lines of .config / include/config/auto.conf, unquoted."""
    config: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            config[key] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    return config


def arch_from_config(config: dict[str, str]) -> str:
    big_endian = config.get("CONFIG_CPU_BIG_ENDIAN") == "y"
    if config.get("CONFIG_X86_64") == "y":
        return "x86_64"
    if config.get("CONFIG_X86_32") == "y":
        return "i686"
    if config.get("CONFIG_ARM64") == "y":
        return "aarch64_be" if big_endian else "aarch64"
    if config.get("CONFIG_ARM") == "y":
        return "armv7l"
    if config.get("CONFIG_RISCV") == "y" and config.get("CONFIG_64BIT") == "y":
        return "riscv64"
    if config.get("CONFIG_LOONGARCH") == "y":
        return "loongarch64"
    if config.get("CONFIG_PPC64") == "y":
        return "ppc64le" if config.get("CONFIG_CPU_LITTLE_ENDIAN") == "y" else "ppc64"
    if config.get("CONFIG_S390") == "y":
        return "s390x"
    raise EulerbakeError(
        "cannot tell the target architecture from the kernel config (no CONFIG_X86_64, CONFIG_ARM64, …)",
        hint="check that the headers' .config is the kernel's real configuration",
    )


def arch_vermagic(headers: Path, arch: str, config: dict[str, str]) -> str:
    """MODULE_ARCH_VERMAGIC (asm/vermagic.h) for the kernels eulerbake targets."""
    srcarch = ARCHES[arch][3]
    if srcarch == "x86":
        if arch == "x86_64":
            return ""  # "X86_64 does not define MODULE_PROC_FAMILY"
    elif srcarch == "powerpc":
        flags = "mprofile-kernel " if config.get("CONFIG_MPROFILE_KERNEL") == "y" else ""
        return flags + ("relocatable " if config.get("CONFIG_RELOCATABLE") == "y" else "")
    header = headers / "arch" / srcarch / "include" / "asm" / "vermagic.h"
    if not header.is_file():
        return ""  # include/linux/vermagic.h defaults MODULE_ARCH_VERMAGIC to ""
    match = re.search(r'^#define\s+MODULE_ARCH_VERMAGIC\s+"([^"]*)"\s*$', header.read_text(errors="replace"), re.M)
    if match:
        return match.group(1)
    raise EulerbakeError(
        f"cannot derive the {arch} vermagic suffix from {header} (it depends on CPU-family options)",
        hint="give the image's own modules directory as well (its modules carry the kernel's exact vermagic)",
    )


def vermagic_from_config(release: str, config: dict[str, str], arch_suffix: str) -> str:
    """VERMAGIC_STRING of include/linux/vermagic.h, from the kernel's configuration."""
    def enabled(option: str) -> bool:
        return config.get(option) == "y"

    parts = [release + " "]
    parts.append("SMP " if enabled("CONFIG_SMP") else "")
    # 5.10 spells it CONFIG_PREEMPT, 6.x CONFIG_PREEMPT_BUILD (selected by PREEMPT and PREEMPT_DYNAMIC).
    if enabled("CONFIG_PREEMPT_BUILD") or enabled("CONFIG_PREEMPT"):
        parts.append("preempt ")
    elif enabled("CONFIG_PREEMPT_RT"):
        parts.append("preempt_rt ")
    parts.append("mod_unload " if enabled("CONFIG_MODULE_UNLOAD") else "")
    parts.append("modversions " if enabled("CONFIG_MODVERSIONS") else "")
    parts.append(arch_suffix)
    return "".join(parts)


def _randstruct_suffix(headers: Path, config: dict[str, str]) -> str:
    if config.get("CONFIG_RANDSTRUCT") != "y" and config.get("CONFIG_GCC_PLUGIN_RANDSTRUCT") != "y":
        return ""
    seed_header = headers / "include" / "generated" / "randstruct_hash.h"
    match = re.search(r'RANDSTRUCT_HASHED_SEED\s+"([^"]*)"', seed_header.read_text() if seed_header.is_file() else "")
    if not match:
        raise EulerbakeError(f"the kernel uses RANDSTRUCT but {seed_header} is missing", hint="use complete headers")
    prefix = "RANDSTRUCT_" if config.get("CONFIG_RANDSTRUCT") == "y" else "RANDSTRUCT_PLUGIN_"
    return prefix + match.group(1)


@dataclass(frozen=True)
class Exclude:
    """The module under test, kept out of every lookup: its (normalised) names and install paths."""

    names: frozenset[str] = frozenset()
    paths: frozenset[str] = frozenset()  # relative to lib/modules/<kver>/, compression suffix dropped

    @classmethod
    def module(cls, module: KernelModule, installed_as: str | None = None) -> Exclude:
        names = {normalise_module_name(n) for n in (module.name, module.path.name.split(".", 1)[0]) if n}
        paths = {_stem_path(installed_as)} if installed_as else set()
        return cls(frozenset(names), frozenset(paths))

    def covers(self, name: str, relative: str) -> bool:
        return normalise_module_name(name) in self.names or _stem_path(relative) in self.paths


def _stem_path(relative: str) -> str:
    for suffix in MODULE_SUFFIXES:
        if relative.endswith(suffix):
            return relative[: -len(suffix)]
    return relative


@dataclass(frozen=True)
class _Evidence:
    name: str
    relative: str
    gpl_compatible: bool
    import_ns: frozenset[str]


class CrcEvidence:
    """What the modules a kernel ships know about its exports: the `__versions` CRCs they import.

    Used when a modules directory comes without Module.symvers/symvers.gz: every shipped module records
    the kernel's CRC of each symbol it imports, `module_layout` included. A shipped module loads, so a
    symbol a non-GPL module imports is not GPL-only, and its namespace is one the importer imports.
    Scanning thousands of modules costs ~1.5 ms each, so modules are read lazily, only until every symbol
    asked for is found in a module that is not the one under test.
    """

    def __init__(self, moddir: Path, modules: Iterable[Path]) -> None:
        self.moddir = moddir
        self._pending: Iterator[Path] = iter(modules)
        self._modules: list[_Evidence] = []
        self._seen: dict[str, list[tuple[int, int]]] = {}  # symbol → [(module index, crc)]
        self.modules_read = 0

    def _read_next(self) -> bool:
        for path in self._pending:
            try:
                module = read_module(path)
            except EulerbakeError:
                continue
            relative = path.relative_to(self.moddir).as_posix() if path.is_relative_to(self.moddir) else path.name
            index = len(self._modules)
            self._modules.append(_Evidence(module.name, relative, module.license in GPL_COMPATIBLE,
                                           frozenset(module.modinfo.get("import_ns", []))))
            self.modules_read += 1
            for name, crc in (module.versions or {}).items():
                self._seen.setdefault(name, []).append((index, crc))
            return True
        return False

    def _usable(self, symbol: str, exclude: Exclude) -> list[tuple[_Evidence, int]]:
        found = [(self._modules[i], crc) for i, crc in self._seen.get(symbol, [])]
        return [(m, crc) for m, crc in found if not exclude.covers(m.name, m.relative)]

    def lookup(self, symbols: Iterable[str], exclude: Exclude = Exclude()) -> dict[str, Export]:
        """Exports for the symbols some shipped module (not the excluded one) imports; others are left out."""
        wanted = set(symbols)
        while any(not self._usable(s, exclude) for s in wanted) and self._read_next():
            pass
        found: dict[str, Export] = {}
        for symbol in wanted:
            usable = self._usable(symbol, exclude)
            if not usable:
                continue
            possible: set[str] | None = None
            for module, _crc in usable:
                allowed = {"", *module.import_ns}
                possible = allowed if possible is None else possible & allowed
            namespaces = frozenset(possible or {""})
            found[symbol] = Export(
                crc=usable[0][1],
                owner="?",
                gpl_only=False if any(not m.gpl_compatible for m, _crc in usable) else None,
                namespace="" if namespaces == {""} else None,
                possible_namespaces=namespaces,
            )
        return found


class ModuleExports:
    """Symbols the installed modules export, read from each module's own __ksymtab on demand.

    modules.symbols (depmod's `alias symbol:<name> <module>`) says which module exports what; without
    it every module is read once, the first time a symbol is not found in vmlinux.
    """

    def __init__(self, moddir: Path, modules: list[Path]) -> None:
        self.moddir = moddir
        self._paths = {normalise_module_name(p.name.split(".", 1)[0]): p for p in modules}
        self._owners: dict[str, str] | None = None
        self._tables: dict[str, dict[str, Export]] = {}
        symbols_file = moddir / "modules.symbols"
        if symbols_file.is_file():
            owners: dict[str, str] = {}
            for line in symbols_file.read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "alias" and parts[1].startswith("symbol:"):
                    owners.setdefault(parts[1][len("symbol:"):], normalise_module_name(parts[2]))
            self._owners = owners

    def _table(self, owner: str) -> dict[str, Export]:
        if owner not in self._tables:
            path = self._paths.get(owner)
            table: dict[str, Export] = {}
            if path is not None:
                try:
                    module = read_module(path)
                except EulerbakeError:
                    module = None
                if module is not None:
                    table = {name: Export(e.crc, owner, e.gpl_only, e.namespace) for name, e in module.exports.items()}
            self._tables[owner] = table
        return self._tables[owner]

    def get(self, symbol: str, exclude: Exclude) -> Export | None:
        if self._owners is None:  # no modules.symbols: read them all, once
            self._owners = {}
            for each in self._paths:
                for name in self._table(each):
                    self._owners.setdefault(name, each)
        owner = self._owners.get(symbol)
        if owner is None or owner not in self._paths:
            return None
        path = self._paths[owner]
        relative = path.relative_to(self.moddir).as_posix() if path.is_relative_to(self.moddir) else path.name
        if exclude.covers(owner, relative):
            return None
        return self._table(owner).get(symbol)


UNKNOWN = object()  # a lookup the evidence cannot settle


@dataclass
class KernelTarget:
    """The kernel a module must load into: its vermagic, architecture, config, exports and trusted keys.

    Config-derived flags are None when no kernel config was found ("cannot tell (no config)").
    """

    release: str
    vermagic: str | None
    arch: str
    modversions: bool
    force_load: bool | None  # CONFIG_MODULE_FORCE_LOAD: a module without __versions/vermagic loads, tainting
    missing_namespace_allowed: bool | None = False  # CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS
    sig_enforce: bool | None = False  # CONFIG_MODULE_SIG_FORCE
    exports: dict[str, Export] | None = None  # complete export table (Module.symvers), when known
    vmlinux_exports: dict[str, Export] | None = None  # vmlinux's exports (from a kernel image)
    module_exports: ModuleExports | None = None  # the installed modules' own exports
    evidence: CrcEvidence | None = None  # CRCs seen in shipped modules, when no export table is known
    modules: frozenset[str] | None = None  # loadable + built-in module names, when known
    builtin: frozenset[str] | None = None  # modules.builtin
    certificates: tuple[bytes, ...] = ()  # DER X.509: keys the kernel trusts for module signatures
    origin: dict[str, str] = field(default_factory=dict)  # fact → "<kind> <where it was read>"
    sources: list[dict[str, str]] = field(default_factory=list)  # [{"kind", "path"}] in the order given

    @property
    def machine(self) -> str:
        return ARCHES[self.arch][0] if self.arch in ARCHES else self.arch

    @property
    def elf_class(self) -> int:
        return ARCHES[self.arch][1] if self.arch in ARCHES else 64

    @property
    def little_endian(self) -> bool:
        return ARCHES[self.arch][2] if self.arch in ARCHES else True

    @property
    def exports_complete(self) -> bool:
        return self.exports is not None or (self.vmlinux_exports is not None and self.module_exports is not None)

    def summary(self) -> dict[str, Any]:
        exports = self.exports if self.exports is not None else self.vmlinux_exports
        return {
            "release": self.release,
            "vermagic": self.vermagic,
            "arch": self.arch,
            "modversions": self.modversions,
            "exports": len(exports) if exports is not None else None,
            "modules": len(self.modules) if self.modules is not None else None,
            "certificates": len(self.certificates),
            "config": {"force_load": self.force_load, "sig_enforce": self.sig_enforce,
                       "missing_namespace_allowed": self.missing_namespace_allowed},
            "origin": dict(self.origin),
            "sources": [dict(s) for s in self.sources],
        }

    # -- symbols -----------------------------------------------------------------------------------
    def lookup(self, symbols: Iterable[str], exclude: Exclude = Exclude()) -> dict[str, Export | None]:
        """Per symbol its export, or None when the kernel certainly does not export it; symbols the
        target cannot settle (evidence only) are left out."""
        symbols = list(dict.fromkeys(symbols))
        if self.exports is not None:
            found: dict[str, Export | None] = {}
            for symbol in symbols:
                export = self.exports.get(symbol)
                # An export of the module under test itself does not count (it would not be loaded yet).
                found[symbol] = None if export is not None and export.owner in exclude.names else export
            return found
        result: dict[str, Export | None] = {}
        rest = []
        for symbol in symbols:
            if self.vmlinux_exports is not None and symbol in self.vmlinux_exports:
                result[symbol] = self.vmlinux_exports[symbol]
            elif self.module_exports is not None and (export := self.module_exports.get(symbol, exclude)):
                result[symbol] = export
            elif self.exports_complete:
                result[symbol] = None
            else:
                rest.append(symbol)
        if rest and self.evidence is not None:
            result.update(self.evidence.lookup(rest, exclude))
        return result

    def crcs(self, symbols: Iterable[str]) -> dict[str, int | None]:
        """Kernel CRC per exported symbol (None: exported without a CRC); others are left out."""
        return {s: e.crc for s, e in self.lookup(symbols).items() if e is not None}

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_headers(cls, headers: Path) -> KernelTarget:
        """Read a kernel-devel tree (`make -C <it> M=…` works with it), or a store output holding one in build/."""
        headers = find_headers_tree(Path(headers))
        uts = headers / "include" / "generated" / "utsrelease.h"
        match = re.search(r'UTS_RELEASE\s+"([^"]+)"', uts.read_text(errors="replace"))
        if not match:
            raise EulerbakeError(f"{uts} does not define UTS_RELEASE", hint="use the headers of a built kernel")
        release = match.group(1)
        config_file = headers / "include" / "config" / "auto.conf"
        if not config_file.is_file():
            config_file = headers / ".config"
        if not config_file.is_file():
            raise EulerbakeError(
                f"kernel headers {headers} have neither include/config/auto.conf nor .config",
                hint="use complete kernel-devel headers: the module flags (SMP, preempt, modversions) come from them",
            )
        config = parse_kconfig(config_file.read_text(errors="replace"))
        arch = arch_from_config(config)
        vermagic = vermagic_from_config(release, config, arch_vermagic(headers, arch, config))
        vermagic += _randstruct_suffix(headers, config)
        symvers = headers / "Module.symvers"
        if not symvers.is_file():
            raise EulerbakeError(
                f"kernel headers {headers} have no Module.symvers: the kernel's symbol CRCs are unknown",
                hint="use the kernel-devel package of the exact kernel build (it ships Module.symvers)",
            )
        exports = parse_module_symvers(symvers.read_text(errors="replace"))
        certificates = _certificates_file(headers / "certs" / "signing_key.x509")
        origin = {"release": f"headers {uts}", "flags": f"headers {config_file}", "config": f"headers {config_file}",
                  "exports": f"headers {symvers}", "modules": f"headers {symvers} (exporting modules only)"}
        if certificates:
            origin["certificates"] = f"headers {headers / 'certs' / 'signing_key.x509'}"
        return cls(
            release=release,
            vermagic=vermagic,
            arch=arch,
            modversions=config.get("CONFIG_MODVERSIONS") == "y",
            force_load=config.get("CONFIG_MODULE_FORCE_LOAD") == "y",
            missing_namespace_allowed=config.get("CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS") == "y",
            sig_enforce=config.get("CONFIG_MODULE_SIG_FORCE") == "y",
            exports=exports,
            modules=frozenset(e.owner for e in exports.values() if e.owner != "vmlinux"),
            certificates=certificates,
            origin=origin,
            sources=[{"kind": "headers", "path": str(headers)}],
        )

    @classmethod
    def from_modules_dir(cls, path: Path) -> KernelTarget:
        """Read an installed `lib/modules/<kver>/` (or a root/store output holding exactly one)."""
        moddir, root = find_modules_dir(Path(path))
        release = moddir.name
        modules = list(installed_modules(moddir))
        # The kernel's vermagic is what its own (in-tree) modules carry: a module added to the image later,
        # perhaps the very one under test, must not decide it. The most common among a few of them wins.
        samples: list[KernelModule] = []
        in_tree_dir = moddir / "kernel"
        for candidate in sorted(modules, key=lambda p: not p.is_relative_to(in_tree_dir)):
            try:
                module = read_module(candidate)
            except EulerbakeError:
                continue
            if module.vermagic:
                samples.append(module)
            if len(samples) >= 9:
                break
        intree = [m for m in samples if "intree" in m.modinfo] or samples
        magics = [m.vermagic for m in intree]
        sample = max(intree, key=lambda m: magics.count(m.vermagic)) if intree else None
        if sample is None or not sample.vermagic:
            raise EulerbakeError(
                f"{moddir} holds no readable kernel module to take the kernel's vermagic from",
                hint="give the kernel headers or the kernel image too (--kernel HEADERS, --kernel /boot/vmlinuz-…)",
            )
        names = {normalise_module_name(p.name.split(".", 1)[0]) for p in modules}
        builtin: frozenset[str] | None = None
        builtin_file = moddir / "modules.builtin"
        if builtin_file.is_file():
            builtin = frozenset(normalise_module_name(Path(line).name.split(".", 1)[0])
                                for line in builtin_file.read_text(errors="replace").split() if line)
            names |= builtin
        origin = {"release": f"modules-dir {moddir}", "flags": f"modules-dir vermagic of {sample.path}",
                  "modules": f"modules-dir {moddir}/modules.*"}
        exports = None
        evidence = None
        module_exports = None
        symvers = find_symvers(moddir, root, release)
        if symvers is not None:
            exports = parse_module_symvers(read_text_maybe_compressed(symvers))
            origin["exports"] = f"modules-dir {symvers}"
        else:
            module_exports = ModuleExports(moddir, modules)
            evidence = CrcEvidence(moddir, modules)
            origin["exports"] = f"modules-dir __versions of the modules in {moddir} (no Module.symvers shipped)"
        flags = sample.vermagic.split(" ")[1:]
        # The installed kernel's config (/boot/config-<kver>, or RHEL-style lib/modules/<kver>/config).
        config: dict[str, str] | None = None
        for candidate_config in ([root / "boot" / f"config-{release}"] if root is not None else []) + [
                moddir / "config"]:
            if candidate_config.is_file():
                config = parse_kconfig(candidate_config.read_text(errors="replace"))
                origin["config"] = f"modules-dir {candidate_config}"
                break
        return cls(
            release=release,
            vermagic=sample.vermagic,
            arch=sample.arch,
            modversions="modversions" in flags,
            force_load=_option(config, "CONFIG_MODULE_FORCE_LOAD"),
            missing_namespace_allowed=_option(config, "CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS"),
            sig_enforce=_option(config, "CONFIG_MODULE_SIG_FORCE"),
            exports=exports,
            module_exports=module_exports,
            evidence=evidence,
            modules=frozenset(names),
            builtin=builtin,
            origin=origin,
            sources=[{"kind": "modules-dir", "path": str(moddir)}],
        )

    def with_image(self, image: KernelTarget) -> KernelTarget:
        """These headers checked against an image's own modules (see `combine`)."""
        return self.combine(image)

    def combine(self, other: KernelTarget) -> KernelTarget:
        """Two descriptions of one kernel as one target; each fact from the source that knows it best.

        The release, architecture and vermagic must agree. Installed modules carry the exact vermagic and
        the module list; a complete export table (Module.symvers) beats a kernel image's vmlinux table,
        which beats the evidence of shipped modules; trusted certificates add up.
        """
        if self.release != other.release or self.arch != other.arch or (
                self.vermagic and other.vermagic and self.vermagic != other.vermagic):
            def described(target: KernelTarget) -> str:
                kinds = "+".join(s["kind"] for s in target.sources) or "kernel"
                return f"'{target.vermagic or target.release}' ({target.arch}, from the {kinds})"

            first, second = sorted((self, other), key=lambda t: not any(s["kind"] == "headers" for s in t.sources))
            lead = "the headers are for kernel" if any(s["kind"] == "headers" for s in first.sources) else "one is"
            raise EulerbakeError(
                f"the kernels given are not one kernel: {lead} {described(first)} but the image's kernel is "
                f"{described(second)}",
                hint="give the headers, modules and image of one kernel build (the image's own kernel release)",
            )

        def pick(attribute: str, *order: KernelTarget) -> Any:
            return next((getattr(t, attribute) for t in order if getattr(t, attribute) is not None), None)

        rank = {"modules-dir": 0, "kernel-image": 1, "headers": 2}

        def best(*targets: KernelTarget) -> list[KernelTarget]:
            return sorted(targets, key=lambda t: min((rank.get(s.get("read_as", s["kind"]), 3) for s in t.sources),
                                                     default=3))

        by_modules = best(self, other)
        by_config = sorted((self, other), key=lambda t: "config" not in t.origin)
        origin: dict[str, str] = {}
        for target in reversed(by_modules):
            origin.update(target.origin)
        config_owner = by_config[0]
        for fact in ("config",):
            if fact in config_owner.origin:
                origin[fact] = config_owner.origin[fact]
        exports = pick("exports", self, other)
        if exports is not None:
            origin["exports"] = next(t.origin["exports"] for t in (self, other) if t.exports is not None)
        vmlinux = pick("vmlinux_exports", self, other) if exports is None else None
        if exports is None and vmlinux is not None:
            origin["exports"] = next(t.origin["exports"] for t in (self, other) if t.vmlinux_exports is not None)
        return replace(
            by_modules[0],
            vermagic=pick("vermagic", *by_modules),
            modversions=by_modules[0].modversions if by_modules[0].vermagic else by_modules[1].modversions,
            force_load=pick("force_load", *by_config),
            missing_namespace_allowed=pick("missing_namespace_allowed", *by_config),
            sig_enforce=pick("sig_enforce", *by_config),
            exports=exports,
            vmlinux_exports=vmlinux,
            module_exports=pick("module_exports", *by_modules) if exports is None else None,
            evidence=pick("evidence", *by_modules) if exports is None else None,
            modules=_best_modules(self, other),
            builtin=pick("builtin", *by_modules),
            certificates=tuple(dict.fromkeys(self.certificates + other.certificates)),
            origin=origin,
            sources=[*self.sources, *other.sources],
        )


def _best_modules(*targets: KernelTarget) -> frozenset[str] | None:
    """The full module list of a modules dir beats the exporters a Module.symvers names."""
    for target in targets:
        if target.modules is not None and any(s.get("read_as", s["kind"]) == "modules-dir" for s in target.sources):
            return target.modules
    return next((t.modules for t in targets if t.modules is not None), None)


def _option(config: dict[str, str] | None, option: str) -> bool | None:
    return None if config is None else config.get(option) == "y"


def _certificates_file(path: Path) -> tuple[bytes, ...]:
    """A DER or PEM certificate file (certs/signing_key.x509 of a kernel build, or --signing-cert)."""
    if not path.is_file():
        return ()
    from cryptography import x509

    raw = path.read_bytes()
    try:
        if b"-----BEGIN CERTIFICATE-----" in raw:
            from cryptography.hazmat.primitives.serialization import Encoding

            return tuple(cert.public_bytes(Encoding.DER) for cert in x509.load_pem_x509_certificates(raw))
        x509.load_der_x509_certificate(raw)
    except ValueError:
        return ()
    return (raw,)


def load_certificates(path: Path) -> tuple[bytes, ...]:
    """--signing-cert FILE: DER or PEM X.509 certificate(s); a file that holds none is an error."""
    certificates = _certificates_file(Path(path))
    if not certificates:
        raise EulerbakeError(f"{path} holds no X.509 certificate (DER or PEM)",
                             hint="give the certificate the modules are signed with, e.g. certs/signing_key.x509")
    return certificates


def find_headers_tree(path: Path) -> Path:
    for candidate in (path, path / "build"):
        if (candidate / "include" / "generated" / "utsrelease.h").is_file():
            return candidate
    raise EulerbakeError(
        f"{path} is not a kernel headers tree (no include/generated/utsrelease.h)",
        hint="give a kernel-devel tree such as /usr/src/kernels/<kver> or /usr/src/linux-headers-<kver>",
    )


def find_modules_dir(path: Path) -> tuple[Path, Path | None]:
    """(lib/modules/<kver>, the root above it if any) for a modules dir, lib/modules, a root or a store output."""
    if (path / "modules.dep").is_file() or (path / "modules.order").is_file():
        root = path.parents[2] if path.parent.name == "modules" and path.parent.parent.name == "lib" else None
        return path, root
    for base, root in ((path / "lib" / "modules", path), (path, None)):
        if not base.is_dir():
            continue
        releases = sorted(p.name for p in base.iterdir() if (p / "modules.dep").is_file())
        wanted = (path / "kernel-release").read_text().strip() if (path / "kernel-release").is_file() else None
        if wanted and wanted in releases:
            return base / wanted, root
        if len(releases) == 1:
            return base / releases[0], root
        if len(releases) > 1:
            raise EulerbakeError(
                f"{base} holds modules for several kernels: {', '.join(releases)}",
                hint="point --kernel at one of them: lib/modules/<kver>",
            )
    raise EulerbakeError(
        f"{path} is not a kernel modules directory (no modules.dep under it)",
        hint="give lib/modules/<kver> of the target system (run depmod there if modules.dep is missing)",
    )


def installed_modules(moddir: Path) -> Iterator[Path]:
    """Modules listed in modules.dep (in its order), or every module file when it lists none."""
    listed = False
    dep = moddir / "modules.dep"
    if dep.is_file():
        for line in dep.read_text().splitlines():
            relative = line.split(":", 1)[0].strip()
            if relative and (moddir / relative).is_file():
                listed = True
                yield moddir / relative
    if not listed:
        for found in sorted(moddir.rglob("*")):
            if found.name.endswith(MODULE_SUFFIXES) and found.is_file():
                yield found


def find_symvers(moddir: Path, root: Path | None, release: str) -> Path | None:
    """A symbol version table shipped with an installed kernel (RHEL/openEuler ship symvers.gz).

    Never `build/Module.symvers`: `build` is the headers' symlink, read only when given as --kernel itself.
    """
    candidates = [moddir / "symvers.gz", moddir / "symvers.xz", moddir / "symvers"]
    if root is not None:
        candidates += [root / "boot" / f"symvers-{release}.gz", root / "boot" / f"symvers-{release}.xz"]
    return next((c for c in candidates if c.is_file()), None)

