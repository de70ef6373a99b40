"""Fixtures shared by every test: real NATS, real docker-registry origins, images, PostgreSQL."""

pytest_plugins = ["tests.support.plugin", "tests.support.nats"]
