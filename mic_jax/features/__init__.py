"""The photo-feature cache: a frozen photo tower's outputs, computed once."""
