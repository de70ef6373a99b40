"""Damselfly's services, one package each, plus the ``damselfly`` command line (``services.cli``)."""
