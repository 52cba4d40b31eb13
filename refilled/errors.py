"""The one exception type for bad user input, and the one line every error is printed as.

Anything the user can fix (a bad config value, a missing data folder, a wrong
checkpoint) raises `UserError` with a one-line message that says what is wrong
and how to fix it. The command line turns it into that line on stderr and
exit code 2, with no traceback. The operating system's refusals (permission
denied, a read-only or full disk, a symlink loop, a name too long) are said the
same way (`os_error_line`), and whatever is printed goes through `one_line`:
control characters escaped (a newline in a value cannot split the line), very
long words shortened.
"""

from __future__ import annotations

import errno
import os
import re
import unicodedata


class UserError(Exception):
    """Bad input the user can fix; its message is one line."""


class Diverged(RuntimeError):
    """A training loss became NaN or infinite; the run cannot go on."""


LONGEST_WORD = 200  # characters of one value (a path, a name) shown in a message
LONGEST_LINE = 2000


def escaped(text: str) -> str:
    """`text` with every character that could break a line or a terminal (control characters,
    line and paragraph separators) written as Python writes it in a string (`\\n`, `\\x1b`)."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in str(text))


def shortened(text: str, limit: int = LONGEST_WORD) -> str:
    """`text` at most `limit` characters: its start and its end, joined by an ellipsis."""
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[:limit - tail - 1]}…{text[-tail:]}"


def shown(value: object) -> str:
    """A value the user gave, as a message shows it: escaped and shortened."""
    return shortened(escaped(str(value)))


def one_line(message: object) -> str:
    """A message as it is printed: one line (control characters escaped), each word (a path,
    a value) at most LONGEST_WORD characters and the whole at most LONGEST_LINE."""
    words = escaped(str(message)).split(" ")
    return shortened(" ".join(shortened(w) for w in words), LONGEST_LINE)


# what the operating system refused, as one line: the cause, then what to do
OS_REFUSALS = {
    errno.EACCES: ("permission denied", "check its permissions, or choose another path"),
    errno.EPERM: ("operation not permitted", "check its permissions, or choose another path"),
    errno.EROFS: ("read-only file system", "choose a path on a file system that can be written"),
    errno.ENOSPC: ("no space left on the device (disk full)", "free some space, or choose another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space, or choose another disk"),
    errno.ELOOP: ("too many levels of symbolic links (a symlink loop?)", "fix the link, or choose another path"),
    errno.ENAMETOOLONG: ("file name too long (a name holds at most 255 bytes)", "choose a shorter name"),
    errno.ENOTDIR: ("a part of this path is a file, not a folder", "choose another path"),
    errno.EISDIR: ("is a folder, not a file", "choose another path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EIO: ("input/output error (the device failed to read or write)", "check the disk, or choose another one"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and try again"),
}


def os_error_line(error: OSError) -> str | None:
    """The operating system's refusal as one line that names the path and the cause; None for
    an OSError that is not a refusal of the file system (a bug: its traceback is wanted)."""
    if error.errno not in OS_REFUSALS:
        return None
    cause, remedy = OS_REFUSALS[error.errno]
    paths = [shown(os.fsdecode(p) if isinstance(p, bytes) else p) for p in (error.filename, error.filename2)
             if p is not None]
    if not paths and (quoted := re.search(r"'([^']+)'", str(error))):  # pyarrow names the path in its message
        paths = [shown(quoted.group(1))]
    where = " -> ".join(paths)
    return f"{where}: {cause}: {remedy}" if where else f"{cause}: {remedy}"


def naming(error: OSError, path: object) -> OSError:
    """`error` as it names `path` when it names no file (a write that failed on a full disk)."""
    if error.filename is None and error.errno is not None:
        return OSError(error.errno, error.strerror, str(path))
    return error
