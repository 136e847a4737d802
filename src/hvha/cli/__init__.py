"""Command-line entry points and rendering; no decisions are made here."""
