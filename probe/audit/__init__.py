"""``codedsmooth audit``: query-only robustness audits of any prediction endpoint, and the robustness card they write
(``codedsmooth.models.card.RobustnessCard``, ``source: audit``; its schema is ``docs/card.schema.json``)."""

from .run import AuditConfig, audit_command

__all__ = ["AuditConfig", "audit_command"]
