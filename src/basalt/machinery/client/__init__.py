"""Client side of the machine API: the client config file (contexts) and the gRPC client.

The gRPC client is imported lazily (``from basalt.machinery.client.client import Client``)
so that reading a client config does not pay for importing grpc.
"""

from .config import ClientConfig, Context, default_client_config_path, load_client_config

__all__ = ["ClientConfig", "Context", "default_client_config_path", "load_client_config"]
