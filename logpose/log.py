"""Every logger LogPose writes to, declared in one place."""

import logging

server_log = logging.getLogger("logpose.server")
dns_log = logging.getLogger("logpose.dns")
http_log = logging.getLogger("logpose.http")
access_log = logging.getLogger("logpose.access")
prober_log = logging.getLogger("logpose.prober")
store_log = logging.getLogger("logpose.store")
registry_log = logging.getLogger("logpose.registry")
auth_log = logging.getLogger("logpose.auth")
