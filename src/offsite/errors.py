"""Errors that reach the user as one line and a non-zero exit."""


class OffsiteError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``error: <message>`` and exits with status 2. Messages should say what
    is wrong and, where possible, what to do about it.
    """


class DataUnavailable(OffsiteError):
    """A data source or model could not be fetched (no network, package missing...)."""


class BundleError(OffsiteError):
    """A bundle is missing, corrupted, tampered with, or does not fit the model."""
