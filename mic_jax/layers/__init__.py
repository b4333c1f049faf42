"""Layers the towers and the fusion are built from: attention, dropout, packing, precision, partitioning."""
