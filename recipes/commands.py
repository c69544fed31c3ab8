"""Commands the recipes add to the `eulerbake` CLI (`recipes.COMMANDS`): things that must happen outside the store.

`eulerbake user-data rke2 … --token-file F -o user-data.yaml` renders the RKE2 cloud-config of stage
`user-data` *with* the join token in it. A token is a secret, so this is not a stage: the file is
written only to `-o`, created 0600 and renamed into place whole, never into the store, and checked
with `cloud-init schema` first. A token file others can read is refused (the token would already be
exposed to every user of the machine); a group-readable one is warned about.

`eulerbake packer-key` makes the Packer builder key (`stages/builder_key.py`) when there is none and prints
its path and public half: the `packer-ami` tasks are in the graph once that key exists.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from eulerbake.core.errors import EulerbakeError
from eulerbake.store.local import default_store_root

from recipes.stages import builder_key
from recipes.stages.user_data import ROLES, TEMPLATE, check_token, render_rke2, schema_check, settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eulerbake user-data", description="render EC2 user-data outside the store")
    kinds = parser.add_subparsers(dest="kind", required=True)
    rke2 = kinds.add_parser("rke2", help="RKE2 server or agent cloud-config (the token stays out of the store)",
                            description="Render the RKE2 cloud-config of stage user-data, with the join token, "
                            "to -o (mode 0600).")
    rke2.add_argument("--role", choices=ROLES, default="server")
    rke2.add_argument("--version", required=True, help="pinned RKE2 release, e.g. v1.24.4+rke2r1")
    rke2.add_argument("--channel", default="stable", help="RKE2 channel (default: stable)")
    rke2.add_argument("--server", dest="server_url", help="server to join, e.g. https://10.0.0.10:9345")
    token = rke2.add_mutually_exclusive_group()
    token.add_argument("--token-file", type=Path, help="file holding the join token (mode 0600): put into the output")
    token.add_argument("--token-path", help="path ON THE INSTANCE the token is read from at boot (not a secret)")
    rke2.add_argument("-o", "--output", type=Path, required=True, help="where to write the user-data (mode 0600)")
    return parser


def read_token_file(path: Path) -> str:
    """The join token in `path`; refused when others can read the file, a warning when its group can."""
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise EulerbakeError(f"cannot read the token file {path}: {exc.strerror}", hint="give an existing file") \
            from None
    if not stat.S_ISREG(st.st_mode):
        raise EulerbakeError(f"the token file {path} is not a regular file", hint="give a file holding the token")
    if st.st_mode & stat.S_IROTH:
        raise EulerbakeError(f"the token file {path} is readable by every user (mode {st.st_mode & 0o777:04o})",
                             hint=f"chmod 600 {path} (and consider rotating the token: others could read it)")
    if st.st_mode & stat.S_IRGRP:
        sys.stderr.write(f"warning: the token file {path} is readable by its group (mode {st.st_mode & 0o777:04o}); "
                         f"chmod 600 {path}\n")
    return check_token(text, str(path))


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def write_private(output: Path, text: str, secret: str | None) -> None:
    """Write `text` to `output` with mode 0600 (whatever the umask), checked by cloud-init, renamed into place."""
    if _inside(output, default_store_root()):
        raise EulerbakeError(f"{output} is inside the store; user-data holding a token never goes there",
                             hint="write it somewhere else, e.g. -o ./user-data.yaml")
    output = output.absolute()
    if output.is_dir():
        raise EulerbakeError(f"{output} is a directory", hint="give the file to write, e.g. -o ./user-data.yaml")
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise EulerbakeError(f"cannot write {output}: {exc.strerror}", hint="give a writable directory") from None
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # the umask may have taken bits away, never added any: set it exactly
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if shutil.which("cloud-init"):
            try:
                schema_check(partial)
            except EulerbakeError as err:
                message = err.message.replace(secret, "***") if secret else err.message
                raise EulerbakeError(message, hint=err.hint) from None
        else:
            sys.stderr.write("warning: cloud-init is not installed, the user-data was not checked "
                             "(apt-get install cloud-init)\n")
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def user_data_main(argv: Sequence[str]) -> int:
    """`eulerbake user-data rke2 …` (see the module docstring); returns the exit status."""
    args = _parser().parse_args(list(argv))
    params = settings(role=args.role, channel=args.channel, version=args.version, server_url=args.server_url,
                      token_path=args.token_path)
    token = read_token_file(args.token_file) if args.token_file is not None else None
    if params.server_url and token is None and not params.token_path:
        raise EulerbakeError(f"an RKE2 {params.role} joining {params.server_url} needs the join token",
                             hint="give --token-file FILE (put into the output) or --token-path PATH (read at boot)")
    write_private(args.output, render_rke2(TEMPLATE, params, token), token)
    what = "holds the join token: hand it to EC2 (--user-data file://…) and delete it" if token else "holds no secret"
    print(f"wrote {args.output} (mode 0600): RKE2 {params.role} {params.version}; it {what}")
    return 0


def packer_key_main(argv: Sequence[str]) -> int:
    """`eulerbake packer-key`: make the Packer builder key if there is none, print where it is and its public half.

    The `packer-ami` tasks appear in the graph once a builder key exists (making one runs ssh-keygen, which
    building the graph never does), so this is the step that turns them on.
    """
    parser = argparse.ArgumentParser(prog="eulerbake packer-key",
                                     description="Make (once) and show the SSH key Packer logs in to base AMIs with. "
                                     f"${builder_key.KEY_FILE_ENV} names an existing private key instead.")
    parser.parse_args(list(argv))
    existed = bool(os.environ.get(builder_key.KEY_FILE_ENV)) \
        or (builder_key.state_dir() / builder_key.KEY_NAME).exists()
    path = builder_key.builder_key_path(create=True)
    public = builder_key.builder_public_key(create=False)
    print(f"{'using' if existed else 'made'} the Packer builder key {path} (mode 0600, outside the store)")
    print(public)
    print("`doit list --all | grep packer-ami` now shows the Packer AMI tasks")
    return 0
