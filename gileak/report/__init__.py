"""The leaderboard (rich), its exports (Markdown, CSV, JSON) and the reconstruction figures."""

from gileak.report.exporters import COLUMNS, export
from gileak.report.leaderboard import render_leaderboard

__all__ = ["COLUMNS", "export", "render_leaderboard"]
