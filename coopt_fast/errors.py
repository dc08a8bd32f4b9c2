"""The one exception a user can cause. The CLI prints its message on one line and exits 2."""


class CooptError(Exception):
    """Bad input: a path, flag or file that is wrong. Message names the file/field and the fault."""
