"""Serving backends: how one prompt becomes one completion on a particular server."""
