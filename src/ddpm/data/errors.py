"""The exceptions every data loader raises, so the CLI can print ``str(err)`` as one line."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset could not be found, read, verified or converted.

    The message is one line that names what was wrong (the file, the value) and what is allowed
    or what to do instead; the command line prints it as is.
    """


class ChecksumError(DataError):
    """A file's md5 does not match the published one (a corrupt or tampered download or copy)."""


class DownloadError(DataError):
    """No mirror could be reached; the caller turns this into "put these files there"."""


class NoSplitsError(DataError):
    """A split other than "train" was asked of a source that has none (a folder, an array file)."""
