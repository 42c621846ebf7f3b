"""The ``logpose-server`` process: command line and lifecycle."""
