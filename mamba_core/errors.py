"""User-facing errors. Importing this module never imports torch.

The command line turns `MambaError` into a one-line message and exit code 1, and
`MambaUsageError` into exit code 2. Library users can catch either as `MambaError`.
"""


class MambaError(Exception):
    """A failure the user can act on: the message names the file, key or option and what to do."""

    exit_code = 1


class MambaUsageError(MambaError):
    """An invalid option or combination of options (exit code 2)."""

    exit_code = 2
