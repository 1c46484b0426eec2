"""Access control: the API keys file, who may query and how much (per-client rate and quota), and where the counters live."""
