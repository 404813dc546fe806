"""Data for tritongpt: the GPT-2 tokenizer, dataset preparation into token shards, the training
loader and the HellaSwag evaluation (nanoGPT's `data/` convention)."""
