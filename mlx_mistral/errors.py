import sys
import traceback
import warnings
from collections.abc import Callable


class MistralError(Exception):
    """A user-facing error: one line that names the input and what was expected.

    The CLI, the app and convert print it as `error: <message>` (exit code 2),
    never as a traceback.
    """


def run_command(run: Callable[[], int], debug: bool = False, interrupted: str = "[interrupted]") -> int:
    """A command's exit code: run(), with MistralError printed as `error: <message>` (2), Ctrl-C
    as `interrupted` (130) and anything unforeseen as one line (1); `debug` shows tracebacks.
    Warnings print as one line."""
    warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
    try:
        return run()
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
    except MistralError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything unforeseen: one line unless --debug
        if debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (run with --debug for details)", file=sys.stderr)
        return 1
