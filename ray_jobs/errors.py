"""The project's exception tree. Entry points map these to exit codes; Serve maps them to HTTP errors."""


class SentimentError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(SentimentError):
    """The YAML config or a command-line override is invalid."""


class DataError(SentimentError):
    """A data source is missing, unreadable, empty or malformed."""


class ModelError(SentimentError):
    """A model could not be built, converted or loaded."""


class RegistryError(SentimentError):
    """The MLflow tracking server or model registry failed or holds unexpected state."""


class GateError(SentimentError):
    """The promotion gate could not reach a decision (it then changes nothing)."""


class PromotedNotDeployedError(SentimentError):
    """The gate moved the champion alias to the new version, then a later step (recording, deploying,
    the sample request) failed: the registry has the new champion, what is served may not."""

    def __init__(self, version: str, message: str):
        super().__init__(message)
        self.version = version
