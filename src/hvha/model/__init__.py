"""The typed cluster model: frozen dataclasses built only from validated input."""
