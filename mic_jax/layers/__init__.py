"""The layers the towers and the fusion are built from: attention (with
``masked_softmax``), dropout, packing, precision, partitioning."""
