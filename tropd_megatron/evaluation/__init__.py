"""Evaluation: answer extraction and checking."""
