"""machined's Kubernetes API client: cordon and drain before an upgrade, uncordon after.

:mod:`.client` speaks HTTPS with a kubeconfig's credentials; :mod:`.drain` cordons,
drains and uncordons one Node; :mod:`.intent` is the record on STATE that makes the
uncordon survive the reboot; :mod:`.cordon` ties these to the node (which kubeconfig,
which Node name, events, retries). Imported only when an upgrade drains or a record
is pending: a plain boot loads none of it.
"""
