"""``basaltctl gen``: secrets bundles, machine configs, the client config, signing keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer

from ._common import info, read_text, refuse_overwrite, warn, write_outputs

app = typer.Typer(
    help="Generate secrets, machine configs, client configs and image signing keys.",
    no_args_is_help=True,
)

OUTPUT_TYPES = ("controlplane", "worker", "basaltconfig")


@app.command("secrets")
def gen_secrets(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Where to write the bundle.")
    ] = Path("secrets.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Generate a secrets bundle: CAs, service-account key, tokens, cluster id and secret."""
    from basalt.machinery.config.secrets import generate_secrets

    refuse_overwrite([output], force)
    write_outputs({output: generate_secrets().to_yaml()})
    info("keep it safe: everything secret about the cluster is in this file")


@app.command("signing-key")
def gen_signing_key(
    output: Annotated[
        str,
        typer.Option("-o", "--output", help="Path prefix: writes PREFIX.key and PREFIX.pub."),
    ] = "signing",
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
) -> None:
    """Generate an Ed25519 key pair for signing upgrade bundles.

    PREFIX.key (mode 0600) signs bundles: keep it offline. PREFIX.pub goes into
    ImageVerificationConfig on the nodes that should accept those bundles.
    """
    from basalt.machinery.fileio import write_atomic
    from basalt.machinery.images import generate_signing_key, key_id, load_public_key

    private_path, public_path = Path(f"{output}.key"), Path(f"{output}.pub")
    refuse_overwrite([private_path, public_path], force)
    private_pem, public_pem = generate_signing_key()
    write_atomic(private_path, private_pem, mode=0o600)
    info(f"wrote {private_path}")
    write_atomic(public_path, public_pem, mode=0o644)
    info(f"wrote {public_path}")
    print(f"key id {key_id(load_public_key(public_pem))}")
    info(f"sign bundles with {private_path}; trust {public_path} in ImageVerificationConfig")


def _split(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


@app.command("config")
def gen_config(
    cluster_name: Annotated[str, typer.Argument(help="The cluster's name.")],
    endpoint: Annotated[
        str, typer.Argument(help="Kubernetes API endpoint, e.g. https://192.0.2.10:6443.")
    ],
    with_secrets: Annotated[
        Path | None,
        typer.Option("--with-secrets", help="Secrets bundle to use; without it a new one is made."),
    ] = None,
    version_contract: Annotated[
        str | None,
        typer.Option("--version-contract", help="Pin the defaults to contract X.Y (recommended)."),
    ] = None,
    kubernetes_version: Annotated[
        str | None, typer.Option("--kubernetes-version", help="Kubernetes version, e.g. v1.34.1.")
    ] = None,
    install_disk: Annotated[
        str | None, typer.Option("--install-disk", help="Disk to install to on metal.")
    ] = None,
    install_image: Annotated[
        str | None, typer.Option("--install-image", help="System image to install.")
    ] = None,
    additional_sans: Annotated[
        list[str] | None,
        typer.Option(
            "--additional-sans", help="Extra API certificate SANs (repeat or comma-list)."
        ),
    ] = None,
    dns_domain: Annotated[
        str | None, typer.Option("--dns-domain", help="Cluster DNS domain.")
    ] = None,
    config_patch: Annotated[
        list[str] | None,
        typer.Option("--config-patch", help="Patch for every config: @file or inline YAML."),
    ] = None,
    config_patch_control_plane: Annotated[
        list[str] | None,
        typer.Option("--config-patch-control-plane", help="Patch for control plane configs."),
    ] = None,
    config_patch_worker: Annotated[
        list[str] | None, typer.Option("--config-patch-worker", help="Patch for worker configs.")
    ] = None,
    output_types: Annotated[
        str,
        typer.Option("-t", "--output-types", help="Which of controlplane,worker,basaltconfig."),
    ] = ",".join(OUTPUT_TYPES),
    output_dir: Annotated[
        Path, typer.Option("-o", "--output-dir", help="Directory to write into.")
    ] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
) -> None:
    """Generate controlplane.yaml, worker.yaml and basaltconfig from secrets and patches.

    The same secrets, options, patches and contract always give byte-identical configs.
    """
    from basalt.machinery.client.config import ClientConfig, issue_client_context
    from basalt.machinery.config import GenerateOptions, generate_configs, load_patch
    from basalt.machinery.config.secrets import generate_secrets, load_secrets
    from basalt.machinery.errors import BasaltError
    from basalt.machinery.pki import CertificateAndKey

    types = _split([output_types])
    unknown = [t for t in types if t not in OUTPUT_TYPES]
    if unknown or not types:
        raise BasaltError(
            f"unknown output type(s): {', '.join(unknown) or '(none)'}",
            hint=f"choose from {','.join(OUTPUT_TYPES)}",
        )

    counter = iter(range(1, 1000))
    patches = [load_patch(p, index=next(counter)) for p in config_patch or []]
    cp_patches = [load_patch(p, index=next(counter)) for p in config_patch_control_plane or []]
    worker_patches = [load_patch(p, index=next(counter)) for p in config_patch_worker or []]

    outputs: dict[Path, str] = {}
    if with_secrets is not None:
        secrets = load_secrets(read_text(with_secrets, "secrets bundle"), str(with_secrets))
    else:
        secrets = generate_secrets()
        outputs[output_dir / "secrets.yaml"] = secrets.to_yaml()

    options = GenerateOptions(
        cluster_name=cluster_name,
        endpoint=endpoint,
        version_contract=version_contract,
        kubernetes_version=kubernetes_version,
        install_disk=install_disk,
        install_image=install_image,
        additional_sans=tuple(_split(additional_sans or [])),
        dns_domain=dns_domain,
    )
    generated = generate_configs(
        secrets,
        options,
        patches=patches,
        controlplane_patches=cp_patches,
        worker_patches=worker_patches,
    )
    for message in generated.warnings:
        warn(message)

    if "controlplane" in types:
        outputs[output_dir / "controlplane.yaml"] = generated.controlplane.to_yaml()
    if "worker" in types:
        outputs[output_dir / "worker.yaml"] = generated.worker.to_yaml()
    if "basaltconfig" in types:
        host = urlsplit(endpoint).hostname or endpoint
        os_ca = CertificateAndKey(crt=secrets.certs.os.crt, key=secrets.certs.os.key)
        client = ClientConfig(
            context=cluster_name,
            contexts={
                cluster_name: issue_client_context(os_ca, endpoints=[host]),
            },
        )
        outputs[output_dir / "basaltconfig"] = client.to_yaml()

    refuse_overwrite(list(outputs), force)
    write_outputs(outputs)
    info(f"version contract {generated.contract}")
