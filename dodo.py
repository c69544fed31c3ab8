"""doit entry point: every derivation in recipes/ becomes one task (`doit list --all` shows them).

`doit` builds the default targets (the offline sample), `doit raw:sample:x86_64` one output, and
`doit clean`/`doit forget`/`doit info` work as usual. Outputs live in ./store (or $EULERBAKE_STORE).
"""

from pathlib import Path

from eulerbake.tasks.project import Project

_project = Project(Path(__file__).resolve().parent)

DOIT_CONFIG = _project.doit_config()


def task_eulerbake():  # type: ignore[no-untyped-def]
    """eulerbake derivations."""
    yield from _project.task_dicts()
