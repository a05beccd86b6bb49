"""Data preparation: sources, tokenizer training, tokenization and token shards."""
