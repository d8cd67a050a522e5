"""``python -m relay``: the same as the ``relay`` command."""

from relay.cli.main import run

run()
