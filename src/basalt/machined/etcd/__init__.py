"""etcd on control planes: certificates, the service, bootstrap and join, membership."""
