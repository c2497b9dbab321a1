"""The one exception type that the command line turns into a clean message."""


class SereError(Exception):
    """A problem with the user's input (configuration, data, checkpoint) that they can fix.

    The message says what is wrong and what to do; the `sere` command prints it without a traceback
    and exits non-zero.
    """
