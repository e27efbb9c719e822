"""The two kinds of trouble a run can meet: the user's to fix, and the network's to wait out.

A message that names one of the user's settings names it with :func:`param`; whoever shows the
message words it as its reader knows it (``--split-ratio`` on the command line, ``split_ratio``
in the Prefect UI's form), so the work never assumes where it was started from.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Marks a setting's name inside a message. NUL never occurs in a path, a URL or a number, so
# nothing a message quotes can be mistaken for a mark.
_MARK = "\x00"
_PARAM = re.compile(f"{_MARK}([A-Za-z_][A-Za-z0-9_]*){_MARK}")


def param(name: str) -> str:
    """Setting ``name`` (a flow parameter's or an option's field name) inside a message."""
    return f"{_MARK}{name}{_MARK}"


def field_name(name: str) -> str:
    """A setting as a form, an API call or a deployment's ``--param`` knows it: ``split_ratio``."""
    return name


def option_name(name: str) -> str:
    """A setting as the command line knows it: ``--split-ratio``."""
    return "--" + name.replace("_", "-")


def worded(message: str, name: Callable[[str], str] = field_name) -> str:
    """``message`` with every :func:`param` written by ``name``."""
    return _PARAM.sub(lambda m: name(m.group(1)), message)


class _Worded(Exception):
    """An error whose message may name settings: ``str()`` words them as form fields,
    :meth:`worded` as the reader at hand knows them."""

    def __str__(self) -> str:
        return self.worded()

    def worded(self, name: Callable[[str], str] = field_name) -> str:
        return worded(super().__str__(), name)


class ImageSearchError(_Worded):
    """A problem the user can fix: bad input, a missing file, an unreachable URL.

    The message names the offending value and the fix; the CLI prints it without a traceback
    and a flow run ends Failed with the message alone.
    """


class TransientNetworkError(_Worded):
    """A network failure worth retrying later (connection reset, timeout, HTTP 5xx/408/429).

    Deliberately not an :class:`ImageSearchError`: the download task retries exactly this type
    and nothing else. After the last retry the flow turns it into a user-facing message.
    """
