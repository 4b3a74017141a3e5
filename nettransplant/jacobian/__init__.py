"""Jacobian matching."""
