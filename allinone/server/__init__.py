"""The HTTP service (allinone serve)."""
