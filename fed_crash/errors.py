"""One base class for every error a user can cause (bad config, file, data, spec or adapters).

The CLI prints these as one line; anything else is a bug and keeps its traceback.
"""


class FedCrashError(ValueError):
    """A problem with the user's input; the message names the field, file, row or tensor."""
