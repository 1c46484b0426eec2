"""Attack client: threat models against the service (in-process or over HTTP) and the robustness report."""
