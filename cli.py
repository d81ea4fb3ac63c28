"""Argument types shared by the command-line scripts; each error names the bad value."""

import argparse
import math


def positive_float(text):
    """Parse a finite float greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is invalid: expected a finite number > 0")
    return value


def bounded_int(minimum, maximum=None):
    """Return an argparse type that parses an integer from `minimum` to `maximum`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            limit = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected {limit}")
        return value
    return parse


def accuracy_fraction(text):
    """Parse an accuracy given as a fraction in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is invalid: expected a fraction in (0, 1], "
                                         "such as 0.99")
    return value
