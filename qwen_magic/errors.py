"""Failures a user can act on. The magics show their message as one line (IPython's UsageError)."""


class QwenError(Exception):
    """A failure with a one-line message that says what happened and what to do."""


class OutOfMemory(QwenError):
    pass
