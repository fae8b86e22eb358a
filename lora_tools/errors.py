"""One kind of error for mistakes the user can fix: printed as a single line, never as a traceback.

No torch here: command-line tools (download, wb.py) print their one line without importing it.
"""

import os
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Raised for bad input (config, files, environment). The message says what is wrong, where, and the fix."""


def fail(message: str) -> int:
    """Print one error line and return the exit status for user errors.

    Under torchrun every process finds the same mistake; the first one on each machine prints it.
    """
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
