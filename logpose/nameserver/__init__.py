"""The DNS front end: answers the zone's names from the registry over UDP and TCP.

``answer`` turns a DNS message into its response without sockets, ``transport``
carries messages over the network, and ``zone`` contains the zone's settings.
"""

from logpose.nameserver.answer import Responder
from logpose.nameserver.transport import DnsServer
from logpose.nameserver.zone import ZoneSettings

__all__ = ["DnsServer", "Responder", "ZoneSettings"]
