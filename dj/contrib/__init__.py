"""Integrations with other frameworks. Each imports its framework only when it is used."""
