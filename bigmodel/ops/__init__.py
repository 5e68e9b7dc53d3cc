from . import lstm  # noqa: F401
