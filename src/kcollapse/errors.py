"""User-facing errors.

Anything the user can fix (a config typo, a missing file, a malformed benchmark row) raises `UserError` with one
line that names the file or field, what was found and what is expected. The CLI prints that line and exits with
code 2; no traceback unless `--debug`.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always a single line
