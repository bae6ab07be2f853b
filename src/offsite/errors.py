"""Errors that reach the user as one line and a non-zero exit."""

from __future__ import annotations

import re


class OffsiteError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``error: <message>`` and exits with status 2. Messages should say what
    is wrong and, where possible, what to do about it.
    """


class DataUnavailable(OffsiteError):
    """A data source or model could not be fetched (no network, package missing...)."""


class BundleError(OffsiteError):
    """A bundle is missing, corrupted, tampered with, or does not fit the model."""


# C0 and C1 controls (newlines, carriage returns, terminal escapes), DEL, the Unicode line and
# paragraph separators and the bidirectional overrides: what could split a message into lines of a
# peer's choosing, or drive the terminal it is printed on.
CONTROL_CHARS = "\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069"  # a regex class
_CONTROL = re.compile(f"[{CONTROL_CHARS}]")


def one_line(text: str) -> str:
    """``text`` with every control character escaped as Python writes it (``\\n``, ``\\x1b``,
    ``\\u2028``): what the CLI prints of any message, whatever peer-supplied text it quotes."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def describe(exc: BaseException, n: int = 160, typed: bool = True) -> str:
    """A third party's exception (PEFT, safetensors, torch, transformers) as one line: its type
    (unless not ``typed``) and its message with all whitespace runs as single spaces, at most ``n``
    characters."""
    text = " ".join(str(exc).split())[:n]
    if not typed:
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
