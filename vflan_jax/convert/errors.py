"""The one exception conversions raise for bad inputs."""


class ConversionError(ValueError):
    """A checkpoint cannot be converted. The message names the file and the tensor at fault."""
