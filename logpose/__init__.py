"""LogPose: a service discovery server answering over DNS and JSON/HTTP."""

__version__ = "0.1.0"
