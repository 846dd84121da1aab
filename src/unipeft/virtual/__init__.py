"""Virtual tokens and prefixes inserted into stock transformers calls, for every prompt-based method
(inputs.py); where a seq2seq prefix goes (prefix_attention.py); prefixes in a cache (prefix_cache.py)."""
