"""The two kinds of trouble a run can meet: the user's to fix, and the network's to wait out."""

from __future__ import annotations


class ImageSearchError(Exception):
    """A problem the user can fix: bad input, a missing file, an unreachable URL.

    The message names the offending value and the fix; the CLI prints it without a traceback
    and a flow run ends Failed with the message alone.
    """


class TransientNetworkError(Exception):
    """A network failure worth retrying later (connection reset, timeout, HTTP 5xx/408/429).

    Deliberately not an :class:`ImageSearchError`: the download task retries exactly this type
    and nothing else. After the last retry the flow turns it into a user-facing message.
    """
