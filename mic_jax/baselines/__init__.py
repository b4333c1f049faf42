"""Baselines beside the deep systems: linear anchors and late fusion."""
