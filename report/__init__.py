"""Run reports: one self-contained HTML file about a run directory, with plots (`thresher report RUN_DIR`)."""

from thresher.report.page import REPORT_FILE, build_report, write_report

__all__ = ["REPORT_FILE", "build_report", "write_report"]
