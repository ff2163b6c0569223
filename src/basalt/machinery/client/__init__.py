"""Client side of the machine API: the client config file (contexts), later the gRPC client."""

from .config import ClientConfig, Context, default_client_config_path, load_client_config

__all__ = ["ClientConfig", "Context", "default_client_config_path", "load_client_config"]
