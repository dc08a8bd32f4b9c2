"""The one exception a user can cause. The CLI prints its message on one line and exits 2."""


class CooptError(Exception):
    """Bad input: a path, flag or file that is wrong. Message names the file/field and the fault."""


class WaitingError(CooptError):
    """Not an error of the input: the command needs what another participant has yet to publish.
    The CLI exits 75 (EX_TEMPFAIL: try again later); what this run could publish is published."""

    exit_code = 75


class DiskFullError(CooptError):
    """A write failed for lack of space or a file size limit (ENOSPC/EFBIG)."""


# How a write that ran out of room shows up: OS errors, HDF5's messages, and torch.save's C++
# stream failing ("iostream error", then its zip writer's "unexpected pos" as the outer error).
DISK_FULL_MARKERS = ("No space left", "File too large", "errno = 28", "errno = 27", "iostream error")


def is_disk_full(e: BaseException) -> bool:
    import errno

    for x in (e, e.__context__):
        if x is not None and (getattr(x, "errno", None) in (errno.ENOSPC, errno.EFBIG)
                              or any(m in str(x) for m in DISK_FULL_MARKERS)):
            return True
    return False


class disk_guard:
    """Turn a failed write for lack of space (however the library reports it) into a DiskFullError
    naming `where`; the CLI prints it as one line."""

    def __init__(self, where):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if e is not None and not isinstance(e, DiskFullError) and isinstance(e, (OSError, RuntimeError)) \
                and is_disk_full(e):
            import re

            # HDF5's message names the file it failed to write: more precise than `where`.
            m = re.search(r"filename = '([^']+)'", str(e)) or re.search(r"'([^']+)'", str(getattr(e, "filename", "")))
            raise DiskFullError(f"{m.group(1) if m else self.where}: disk full or file size limit reached while writing") from None
        return False
