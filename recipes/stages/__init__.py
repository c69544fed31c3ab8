"""The stages: one module per stage, named like the stage (`kmod_build.py` is stage `kmod-build`).

Each stage module owns a frozen `Params` dataclass (its fields are the manifest's `params`), a factory
named after the stage that returns the `Derivation`, a module-level builder `build(ctx)` and the `TOOLS`
it runs (their versions are part of the key). A stage's key covers its own module and every module it
imports, so a stage imports only what its builder uses: `hygiene.py` is a helper of `raw`, not a stage.

    unpack          .xz/.gz → the plain file (the upstream qcow2)
    qcow2           the offline sample's openEuler-shaped qcow2
    image-modules   the image's /lib/modules/<kver>/ and kernel release
    kernel-headers  kernel-devel RPM or headers dir → a self-contained kbuild tree
    ena-source      drivers/net/ethernet/amazon/ena out of a kernel source tarball
    kmod-build      patches applied, `make M=… modules` against the headers → <module>.ko
    kmod-check      the gate: the module against the target kernel → an overlay tree
    raw             root shrunk, overlays and hygiene applied → the sparse disk.raw
"""
