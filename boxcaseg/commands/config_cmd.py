"""`boxcaseg config list | show`: the configs shipped in the package (boxcaseg/configs/*.toml)."""

from __future__ import annotations

import typer

from boxcaseg.commands.options import command_group


def describe(text: str) -> str:
    """The first comment line of a TOML text, without its ``#`` (empty when it has none)."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line:
            return ""
    return ""


def config_list_command() -> None:
    """Each shipped config: its name (for --config) and what it is (its first comment line)."""
    from boxcaseg.config import shipped_configs
    from boxcaseg.io import read_text

    shipped = shipped_configs()
    width = max((len(n) for n in shipped), default=0)
    for name, path in shipped.items():
        typer.echo(f"{name:<{width}}  {describe(read_text(path, 'config'))}")


def config_show_command(
    name: str = typer.Argument(..., metavar="NAME|FILE", help="A shipped config name (`boxcaseg config list`) "
                               "or a TOML file."),
) -> None:
    """Print a config's TOML text, e.g. to start your own: boxcaseg config show cpu > my.toml"""
    from boxcaseg.config import resolve_config
    from boxcaseg.io import read_text

    typer.echo(read_text(resolve_config(name), "config"), nl=False)


def register(app: typer.Typer) -> None:
    """Add the `config` command group to the main app."""
    command_group(app, "config", "The shipped configs: give their name to --config (e.g. `boxcaseg train --config cpu`).",
                  {"list": config_list_command, "show": config_show_command})
