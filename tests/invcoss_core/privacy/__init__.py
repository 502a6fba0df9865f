"""Tests of the privacy audit (invcoss_core/privacy)."""
