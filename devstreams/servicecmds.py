"""Service-side commands: ``echo``, ``proxy``, ``connect``."""


def register(groups, common) -> None:
    pass
