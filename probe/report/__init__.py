"""``codedsmooth report``: the options (:mod:`.config`, a leaf), typed results (:mod:`.results`), the stages
(:mod:`.training`, :mod:`.stages`, :mod:`.blackbox`, :mod:`.sizes`, :mod:`.checks`, :mod:`.paired`), their order
(:mod:`.pipeline`) and the text (:mod:`.render`)."""

from .config import QUICK_NOTE, ReportConfig
from .pipeline import run_report

__all__ = ["QUICK_NOTE", "ReportConfig", "run_report"]
