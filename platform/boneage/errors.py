"""The platform's user-facing errors."""


class JobError(Exception):
    """A problem with the job's input, data or settings: the job reports it as one clear line, not a traceback."""
