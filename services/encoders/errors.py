"""Errors of the frozen encoder registry."""


class EncoderError(ValueError):
    """An encoder name, option or input that cannot be used; the message names it and the fix."""


class CodecError(EncoderError):
    """An image codec cannot do what was asked (bad input shape, no decoder, missing weights)."""
