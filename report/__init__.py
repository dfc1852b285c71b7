"""Run reports: an HTML summary of a run directory with plots."""
