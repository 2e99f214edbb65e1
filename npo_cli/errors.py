"""The one exception type a user sees. The CLI prints it as a single line and exits 1."""


class NpoError(Exception):
    """Bad input or a refused operation. The message says what to fix, in one line."""


def os_reason(e: OSError) -> str:
    """'permission denied' from PermissionError(13, 'Permission denied'): the OS's words, for a sentence."""
    if e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
