"""Builders of the bundled data sets (Kaldi data directories from Debian packages); training never
imports them."""
