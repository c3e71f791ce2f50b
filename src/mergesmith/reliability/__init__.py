"""Trustworthy merges: check a recipe before reading weights, audit the output, resume safely."""
