"""Reading an operator's input files with bounds: a regular file only, of at most a given size.

A path in a manifest or on a command line can name anything: a device
(`/dev/zero` never ends), a FIFO (blocks for ever), a folder. Each is
refused at once with a message naming it; the file is opened without
blocking and never read past its cap.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kiosk.errors import UsageError


def read_regular_file(
    path: str | Path, max_bytes: int, what: str = "file", error: type[UsageError] = UsageError
) -> bytes:
    """The bytes of the regular file at `path`, or `error` saying what was wrong with it."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{p}: no such file") from None
    except IsADirectoryError:
        raise error(f"{p}: is a directory, not a {what}") from None
    except OSError as exc:
        raise error(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{p}: is a directory, not a {what}")
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{p}: not a regular file (a device, a FIFO or a socket), not a {what}")
        if info.st_size > max_bytes:
            raise error(f"{p}: {info.st_size / 1e6:.0f} MB, more than a {what}'s {max_bytes // (1024 * 1024)} MB")
        chunks, size = [], 0
        while size <= max_bytes and (chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)[:max_bytes]
    except OSError as exc:
        raise error(f"{p}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
