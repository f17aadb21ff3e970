"""Device-side commands: ``agent``."""


def register(groups, common) -> None:
    pass
