"""Geo-R1's rules, pure: prompts (byte-exact), parsing, coordinate frames, confidence."""
