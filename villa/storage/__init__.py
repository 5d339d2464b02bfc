"""The storage layer: atomic writes, artifact checks, paths and one-line user errors."""
