"""Retrieval evaluation of image models on DocMNIST regions (SPEC section 6)."""
