"""Stage 2: the region-text contrastive vision-language model (SPEC section 5)."""
