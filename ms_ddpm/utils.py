"""Small helpers shared across the package."""


def check_choice(name, value, choices):
    """Raise a ValueError naming the valid choices when `value` is not one of them; return `value`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
