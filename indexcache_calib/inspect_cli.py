"""Commands registered on the `indexcache` app (see cli._register_commands)."""


def register(app) -> None:
    pass
