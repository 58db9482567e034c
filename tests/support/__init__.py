"""Helpers for the end-to-end tests: a real backend and process control."""
