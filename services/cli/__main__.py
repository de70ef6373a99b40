"""``python -m services.cli``: the same as the ``damselfly`` command."""

from services.cli.main import main

main()
