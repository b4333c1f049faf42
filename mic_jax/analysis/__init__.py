"""Analyses of a trained run: what the photo contributes (ablation, gates)."""
