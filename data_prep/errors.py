"""The one exception type the CLI turns into `data_prep: error: ...` and exit status 1."""


class DataPrepError(Exception):
    """A problem the user has to fix (bad input, wrong option, existing output); the message
    names the file and says what to change."""
