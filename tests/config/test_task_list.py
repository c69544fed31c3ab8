"""`doit list`: a stage's group task says what the stage does, not what its first task does."""

from __future__ import annotations

import re

from eulerbake.tasks.project import Project
from recipes import releases
from tests.config.conftest import REPO, WriteConfig


def test_group_tasks_describe_their_stage_not_one_cell(write_config: WriteConfig) -> None:
    write_config("[tool.eulerbake]\n")
    project = Project(REPO)
    groups = {entry["basename"]: entry["doc"] for entry in project.task_dicts([]) if entry.get("name") is None}
    assert {"ami", "boot", "raw", "maas-upload", "fetch"} <= set(groups)
    cells = re.compile("|".join(re.escape(version) for version in releases.RELEASES) + r"|sample:")
    for stage, doc in groups.items():
        assert doc and not cells.search(doc), (stage, doc)
        assert not doc.startswith(("Stage `", "Publication `")), (stage, doc)
    assert groups["boot"].startswith("boot the raw image under QEMU")
    assert "AMI" in groups["ami"]
