"""containerd on a node: its service, a small client over our proto subset, image
import (OCI image layout or docker-archive tars) and one-shot container runs."""
