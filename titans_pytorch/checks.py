"""Argument checks shared by the modules: one wording for one kind of mistake."""


def check_positive_ints(**values):
    """Raise `ValueError` naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_non_negative_ints(**values):
    """Raise `ValueError` naming the first argument that is not an integer >= 0."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
