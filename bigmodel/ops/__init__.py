from . import attention, lstm  # noqa: F401
