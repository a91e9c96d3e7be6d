"""The README's configuration table, from the settings of every command (``python -m chroma_agent.config_table``).

It sits above :mod:`chroma_agent.config` and :mod:`chroma_agent.worker_config` (whose settings build on the
shared ones), so neither imports the other to list them all.
"""

from __future__ import annotations

from chroma_agent.config import (
    SOURCES,
    DemoSettings,
    GenerateSettings,
    PlaygroundSettings,
    ServeSettings,
    Settings,
    default_cell,
)
from chroma_agent.worker_config import WorkerConfig

__all__ = ["command_settings", "markdown_table"]


def command_settings() -> dict[str, type[Settings]]:
    """Each command (as the docs name it) and its settings class."""
    classes: list[type[Settings]] = [GenerateSettings, DemoSettings, ServeSettings, PlaygroundSettings,
                                     WorkerConfig]
    return {cls.command: cls for cls in classes}


def markdown_table() -> str:
    """The configuration table of the README, from the settings classes themselves."""
    commands = command_settings()
    rows = ["| flag | environment | meaning | default | commands |", "| --- | --- | --- | --- | --- |"]
    for name, source in SOURCES.items():
        takers = [command for command, cls in commands.items() if name in cls.model_fields]
        if not takers:
            continue
        by_default: dict[str, list[str]] = {}
        for command in takers:
            by_default.setdefault(default_cell(commands[command], name), []).append(command)
        first, *others = by_default
        default = first + "".join(f" (`{'`, `'.join(by_default[cell])}`: {cell})" for cell in others)
        env = ", ".join(f"`{var}`" for var in source.env)
        meaning = source.help + (f" ({source.note})" if source.note else "")
        rows.append(f"| `{source.flag}` | {env} | {meaning} | {default} | {', '.join(f'`{c}`' for c in takers)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m chroma_agent.config_table: print the README's configuration table
    print(markdown_table(), end="")
