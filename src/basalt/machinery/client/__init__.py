"""Client side of the machine API: the client config file (contexts) and the gRPC client.

Both are imported on first use: ``from basalt.machinery.client.client import Client``
does not pay for the config file's YAML, and reading a client config does not pay for
grpc (a node's first boot imports the gRPC side before its maintenance API opens).
"""

from typing import TYPE_CHECKING

from basalt.machinery import lazy

if TYPE_CHECKING:
    from .config import ClientConfig, Context, default_client_config_path, load_client_config

__getattr__ = lazy.exports(
    __name__,
    {"config": ("ClientConfig", "Context", "default_client_config_path", "load_client_config")},
)

__all__ = ["ClientConfig", "Context", "default_client_config_path", "load_client_config"]
