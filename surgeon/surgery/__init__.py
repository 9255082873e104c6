"""Rewriting: swapping matched blocks for replacements, replaying recorded surgery, and deployment forms."""
