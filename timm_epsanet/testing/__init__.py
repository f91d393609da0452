"""Test helpers for running timm's own tooling against the EPSANet models."""
