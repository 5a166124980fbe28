"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class AtlasError(Exception):
    """A problem with the user's input or environment, explained in one line.

    Raise it with a message that names the offending thing (a path, a model, a flag).
    The CLI prints ``error: <message>`` and exits with status 2; anything else that
    escapes is a bug and is reported as such.
    """
