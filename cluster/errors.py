"""The error type the CLI prints as one line (no traceback)."""


class TesseraError(RuntimeError):
    """A user-facing failure: bad configuration, unreachable endpoint, failed job."""
