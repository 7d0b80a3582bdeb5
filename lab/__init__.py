"""The lab: settings, database, workspace, registries, plugin SDK and the `lab` command."""

__version__ = "0.1.0"
