"""The one exception type a user sees. The CLI prints it as a single line and exits 1."""


class NpoError(Exception):
    """Bad input or a refused operation. The message says what to fix, in one line."""


def one_line(e: BaseException) -> str:
    """An exception's first line, for a one-line error (its type's name when it has no message)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def os_reason(e: OSError) -> str:
    """'permission denied' from PermissionError(13, 'Permission denied'): the OS's words, for a sentence."""
    if e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    return one_line(e)
