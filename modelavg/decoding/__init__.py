"""Word decoding for the demo models: pocketsphinx senones, HCLG graphs, beam search, WER."""
