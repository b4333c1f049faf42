"""Evaluation of a run: every example once, metrics, calibration, reports,
plots."""
