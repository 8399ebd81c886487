"""One exception family for the whole package.

Every error a user can cause or meet says what went wrong and what to do about it. The CLI turns any
`EnergyError` into a one-line message and a non-zero exit instead of a traceback.
"""


class EnergyError(Exception):
    """Base class of every error raised by langchain-energy."""


class ConfigError(EnergyError, ValueError):
    """A parameter, knob or option has a value that cannot work (negative length, unknown name, ...)."""


class UnsupportedError(ConfigError, NotImplementedError):
    """The backend cannot do what was asked (tools on Parrot); a `NotImplementedError` too, as LangChain expects
    of a model without a capability, so code that falls back on one (``bind_tools``) falls back here."""


class ModelNotFoundError(ConfigError):
    """A model name or directory could not be resolved to something vLLM can serve."""


class ContextLengthError(ConfigError):
    """A prompt or chunk does not fit in the model's context window."""


class DataError(ConfigError):
    """Input documents or datasets are missing, empty, unreadable or cannot be loaded offline."""


class BackendError(EnergyError):
    """A serving backend (vLLM, Parrot) failed a request."""


class AuthenticationError(BackendError):
    """The server refused the API key (HTTP 401/403): it is missing or wrong. The key itself is never shown."""


class BackendUnreachableError(BackendError):
    """No server answered at the configured address within the timeout."""


class ServerStartError(BackendError):
    """A managed server did not become healthy; the message quotes the tail of its log."""


class ServerDiedError(BackendError):
    """A managed server exited while it was in use; the message says where its log is."""


class InfeasibleConfigError(ServerStartError):
    """The engine cannot run this configuration for lack of memory (KV cache too small, OOM at start)."""


class MeterError(EnergyError):
    """An energy meter could not be read or configured."""


class PowerCapError(EnergyError):
    """A GPU power cap could not be read, set, verified or restored."""


class PowerCapPermissionError(PowerCapError):
    """Setting the GPU power limit needs a privilege (SYS_ADMIN / root) that this process lacks."""


class ParrotError(BackendError):
    """Parrot's ServeCore returned an error, or a semantic variable never became ready."""
