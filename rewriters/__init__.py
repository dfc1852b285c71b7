"""Rewriters: steps that polish kept responses (ReAlign-style format rewriting)."""
