"""``python -m services.cli``: the same as the ``damselfly`` command."""

from services.cli.entry import main

main()
