"""User-facing errors.

Anything the user can fix (a config typo, a missing file, a malformed benchmark row) raises `UserError` with one
line that names the file or field, what was found and what is expected. The CLI prints that line and exits with
code 2; no traceback unless `--debug`. A worker process that died mid-run (`WorkerDied`: the out-of-memory killer, a
signal) is one line too, with how to resume, exit code 1.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always a single line


class WorkerDied(Exception):
    """A worker process ended before its job was done; what the run finished is kept, and it resumes."""
