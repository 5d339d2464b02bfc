"""Using a trained model: loading, grounding queries, prediction files, export folders and drawings."""
