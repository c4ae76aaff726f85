"""One exception family for bad input, raised before any work starts."""


class MetaEnsembleError(Exception):
    """Base class: something the user gave us is wrong; the message says what is valid."""


class ConfigError(MetaEnsembleError, ValueError):
    """Unknown key, wrong type, invalid value, unknown registry name."""


class DataError(MetaEnsembleError, FileNotFoundError):
    """Missing or malformed dataset files."""


class CheckpointError(MetaEnsembleError, ValueError):
    """Missing, corrupt or mismatched checkpoint."""


class SearchSpaceError(ConfigError):
    """Invalid search-space file."""


class ZooError(MetaEnsembleError, LookupError):
    """The teacher zoo lacks what was asked for."""
