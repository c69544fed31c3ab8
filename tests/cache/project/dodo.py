"""doit entry point with caches: what `eulerbake.tasks.project` does once it builds its store with the
configured substituters (see the cache work's patch), done here by the project itself."""

import sys
from pathlib import Path

from eulerbake.store.local import Store, default_store_root
from eulerbake.store.substituters import CacheSettings, caches_for
from eulerbake.tasks import planning
from eulerbake.tasks.project import Project

ROOT = Path(__file__).resolve().parent
SETTINGS = CacheSettings.load(ROOT)
_project = Project(ROOT, Store(default_store_root(ROOT), substituters=caches_for(SETTINGS)))

DOIT_CONFIG = _project.doit_config()


def task_eulerbake():  # type: ignore[no-untyped-def]
    """eulerbake derivations, planned against the caches."""
    yield from planning.project_task_dicts(_project, SETTINGS, planning.requested_tasks(sys.argv[1:]))
