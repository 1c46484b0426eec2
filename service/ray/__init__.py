"""Serving on Ray Serve (``--replicas`` / ``--ray-address``)."""
