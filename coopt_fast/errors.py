"""The one exception a user can cause. The CLI prints its message on one line and exits 2."""


class CooptError(Exception):
    """Bad input: a path, flag or file that is wrong. Message names the file/field and the fault."""


class DiskFullError(CooptError):
    """A write failed for lack of space or a file size limit (ENOSPC/EFBIG)."""


DISK_FULL_MARKERS = ("No space left", "File too large", "errno = 28", "errno = 27")


def is_disk_full(e: BaseException) -> bool:
    import errno

    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG) or any(m in str(e) for m in DISK_FULL_MARKERS)
