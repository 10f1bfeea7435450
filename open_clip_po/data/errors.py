"""The data layer's errors: each message is one line a user can act on (file, pattern or holder named)."""


class DataError(ValueError):
    """Bad data input or a data folder in an unusable state."""


class ClassnamesError(DataError):
    """A class-names file that is missing, empty or does not fit the images."""


class GenderCsvError(DataError):
    """A gender CSV with a bad header or row (the message names file and line)."""


class ShardPatternError(DataError):
    """A shard pattern that matches no file."""


class IncompleteBuildError(DataError):
    """A shard folder whose build did not finish (no completion manifest)."""


class BuildLockedError(DataError):
    """Another builder holds the lock of the output folder (the message names its PID and host)."""
