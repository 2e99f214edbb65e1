"""The one exception type a user sees. The CLI prints it as a single line and exits 1."""


class NpoError(Exception):
    """Bad input or a refused operation. The message says what to fix, in one line."""
