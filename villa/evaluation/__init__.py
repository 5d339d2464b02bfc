"""Evaluation of image models: retrieval and zero-shot detection (docs/method.md section 6)."""
