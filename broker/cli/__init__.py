"""The ``gpubroker`` command line (Typer + Rich): ``app`` with every command of ``commands``,
``history`` and ``sim``; ``workers.cli`` adds ``worker`` (which needs task code) and is the entry point."""

from broker.cli import commands, history, sim
from broker.cli.common import app

__all__ = ["app", "commands", "history", "sim"]
