"""One error type for bad input: a single line that names the problem and the fix.

The CLI prints ``error: <message>`` for it and exits with code 2 (the argparse convention for usage
errors). Anything else is a bug and keeps its traceback.
"""


class UpcycleError(ValueError):
    """Bad input or an impossible option; the message is one line: what is wrong, then how to fix it."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
