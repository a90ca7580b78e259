from o2mcli.cli.app import app  # noqa: F401
