"""Storage formats of Adam's moments."""
