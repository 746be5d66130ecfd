"""The data package's one error type."""


class DataError(ValueError):
    """Unusable data or tokenizer input: one line naming the config field (or flag) and value."""
