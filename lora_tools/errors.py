"""One kind of error for mistakes the user can fix: printed as a single line, never as a traceback."""


class UserError(Exception):
    """Raised for bad input (config, files, environment). The message says what is wrong, where, and the fix."""
