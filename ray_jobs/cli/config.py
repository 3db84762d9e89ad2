"""`python -m ray_jobs config [--config FILE] [--set ...] [--markdown | --json-schema]`: every config key with
its value, type and description (the values of FILE and the overrides, else the defaults), the reference
page docs/configuration.md (--markdown), or the JSON schema of a config file (--json-schema)."""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator

from pydantic import BaseModel

from ray_jobs.cli.common import EXIT_OK, config_parser, load_from_args, run
from ray_jobs.config import PipelineConfig


def _type_name(annotation) -> str:
    text = str(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "").replace("NoneType", "None")


def keys(cfg: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, object, str]]:
    """(dotted key, type, value, description) of every setting, sections walked in order."""
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            yield from keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", _type_name(field.annotation), value, field.description or ""


def markdown(cfg: PipelineConfig) -> str:
    """The reference page: one table per section, defaults as YAML would write them."""
    out = [
        "# Configuration reference",
        "",
        "Every key of a `tune_configs/*.yaml` file, its type, default and meaning. Generated from the schema",
        "(`ray_jobs/config.py`) by `python -m ray_jobs config --markdown`; a test keeps it current. Set any key",
        "from the command line with `--set section.key=value` (the value is YAML).",
    ]
    section = None
    for key, type_name, value, description in keys(cfg):
        head = key.split(".")[0] if "." in key else "(top level)"
        if head != section:
            section = head
            doc = (type(getattr(cfg, head)).__doc__ or "").split("\n\n")[0] if head != "(top level)" else ""
            out += ["", f"## `{head}`" if head != "(top level)" else "## Top level", ""]
            if doc:
                out += [" ".join(doc.split()), ""]
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        default = json.dumps(value, default=str)
        cell = description.replace("|", "\\|")
        out.append(f"| `{key}` | `{type_name.replace('|', 'or')}` | `{default}` | {cell} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = config_parser("config", "Show every config key: value, type and meaning.", config_required=False)
    form = p.add_mutually_exclusive_group()
    form.add_argument("--markdown", action="store_true", help="the reference page (docs/configuration.md)")
    form.add_argument("--json-schema", action="store_true", help="the JSON schema of a config file")
    args = p.parse_args(argv)

    def body() -> int:
        if args.json_schema:
            print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
            return EXIT_OK
        # Paths as written: load_config makes them absolute for the run, which a reference should not show.
        cfg = PipelineConfig() if args.config is None and not args.overrides else load_from_args(args)
        if args.markdown:
            print(markdown(cfg), end="")
            return EXIT_OK
        for key, type_name, value, description in keys(cfg):
            print(f"{key} = {json.dumps(value, default=str)}  ({type_name})\n    {description}")
        return EXIT_OK

    return run(body, "config")
