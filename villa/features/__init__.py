"""Feature precomputation: the attribute, region and sentence embeddings every stage reads."""
