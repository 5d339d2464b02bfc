"""Stage 2: the region-text contrastive vision-language model (docs/method.md section 5)."""
