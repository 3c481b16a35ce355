class MistralError(Exception):
    """A user-facing error: one line that names the input and what was expected.

    The CLI, the app and convert print it as `error: <message>` (exit code 2),
    never as a traceback.
    """
