"""jinja2 rendering for the stages that write config files (`packer-template`, `user-data`): a helper, not a stage.

StrictUndefined, so a misspelt variable fails the build naming the template and the line instead of
rendering an empty string into a Packer template or a cloud-config. Values reach the output only
through a quoting filter for the target language (`hcl`, `json`, `sh`), never spliced raw.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eulerbake.core.errors import EulerbakeError


def hcl_string(value: object) -> str:
    """A quoted HCL2 string literal: JSON escapes, plus `${`/`%{` escaped so nothing is interpolated."""
    return json.dumps(str(value)).replace("${", "$${").replace("%{", "%%{")


def json_value(value: object) -> str:
    """A JSON value (a valid YAML flow scalar too); ASCII only, so no byte depends on an encoding."""
    return json.dumps(value, sort_keys=True)


def shell_word(value: object) -> str:
    return shlex.quote(str(value))


def packer_user_variable(name: str) -> str:
    """`{{user \\`name\\`}}`: a Packer JSON-template user variable, which jinja2 would otherwise take as its own."""
    return "{{user `" + name + "`}}"


def render(template: Path, variables: Mapping[str, Any]) -> str:
    """`template` rendered with `variables`; an undefined name or a syntax error is one message."""
    import jinja2  # only when building: every doit run imports the recipes

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template.parent),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    environment.filters.update(hcl=hcl_string, json=json_value, sh=shell_word)
    environment.globals.update(user_var=packer_user_variable)
    try:
        return environment.get_template(template.name).render(dict(variables))
    except jinja2.TemplateSyntaxError as exc:
        raise EulerbakeError(f"{template}:{exc.lineno}: {exc.message}", hint="fix the template's jinja2 syntax") \
            from None
    except jinja2.UndefinedError as exc:
        raise EulerbakeError(
            f"{template}: {exc.message}",
            hint=f"the stage renders it with: {', '.join(sorted(variables))}; fix the name in the template "
            "(or pass the value from the stage)",
        ) from None
