"""The operator's command line, ``logpose-command``, and its HTTP client of the API."""
