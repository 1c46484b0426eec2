"""``codedsmooth audit``: query-only robustness audits of any prediction endpoint, and the card they write."""

from .card import AuditCard, card_schema, write_schema
from .run import AuditConfig, audit_command

__all__ = ["AuditCard", "AuditConfig", "audit_command", "card_schema", "write_schema"]
