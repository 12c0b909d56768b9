"""User-facing errors: one clear line, no traceback."""


class ThriftyError(Exception):
    """An error caused by the user's input (a path, a name, a file, a prompt).

    The CLI prints its message as one line and exits non-zero; the server maps it to an
    OpenAI-style error.
    """
