"""The rtnetlink numbers Basalt uses (linux/rtnetlink.h, if_addr.h, if.h, netlink.h), in
one place: :mod:`.netlink` (through pyroute2) and :mod:`.ifaces` (raw requests at boot)
both take them from here."""

from __future__ import annotations

#: netlink(7) protocol, message types and flags.
NETLINK_ROUTE = 0
NLMSG_ERROR = 2
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400

#: Link flags (``ifi_flags``).
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_LOWER_UP = 0x10000

#: Address attributes and flags.
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST, IFA_CACHEINFO = 1, 2, 4, 6
IFA_F_PERMANENT = 0x80
#: The kernel's "forever" address lifetime.
INFINITY_LIFE = 0xFFFFFFFF

#: Route attributes, table, type and scopes.
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY = 1, 4, 5, 6
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
#: Route protocols (who installed a route): ``ip route`` shows them as "proto static|dhcp".
PROTO_STATIC = 4
PROTO_DHCP = 16
