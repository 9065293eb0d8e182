"""User-facing errors: the CLI prints their message (never a traceback) and exits with status 2."""


class MedtuneError(Exception):
    """A problem the user can fix; the message says what and where (file, line, field) and what to do."""


class DataError(MedtuneError):
    """Bad input data: names the file and, where known, the line and the field."""

    def __init__(self, message: str, path: object = None, line: int | None = None, field: str | None = None):
        where = ""
        if path is not None:
            where = str(path) + (f":{line}" if line is not None else "")
            where += f" [{field}]" if field else ""
            where += ": "
        super().__init__(where + message)
        self.message, self.path, self.line, self.field = message, path, line, field

    def __reduce__(self):  # keep path/line/field when raised in a worker process
        return (type(self), (self.message, self.path, self.line, self.field))
