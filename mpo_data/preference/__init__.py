"""Preference pairs: the judge marks samples, pairs are built from them, meta.json lists the pair files."""
