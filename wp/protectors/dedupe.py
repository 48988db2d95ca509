"""The dedupe protector (`wp attach PID --protector dedupe`): the package
wp.dedupe holds it, split by stage; see wp/dedupe/__init__.py."""
from wp.dedupe.protector import DedupeProtector, daemon_stats

__all__ = ["DedupeProtector", "daemon_stats"]
