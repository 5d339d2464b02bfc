"""ViLLA: vision-language learning with attributes (ICCV 2023), re-created and extended.

The public API for using a trained model (imported on first use, so ``import villa`` stays light):

- :func:`villa.load` -> :class:`villa.Model`: ``encode_text``, ``encode_regions``, ``ground``, ``heatmaps``
  (:mod:`villa.inference.model`)
- :func:`villa.export_model`: a self-contained model folder (:mod:`villa.inference.model_folder` holds its format)
- :func:`villa.predict_images`: ground queries in many images and write predictions (:mod:`villa.inference.prediction`)
- :class:`villa.Visualizer`: draw boxes and heatmaps (:mod:`villa.inference.drawing`)
"""

__version__ = "0.1.0"

#: public name -> (module, attribute), imported when first asked for
_LAZY = {
    "load": ("villa.inference.model", "load"),
    "Model": ("villa.inference.model", "Model"),
    "PreparedImage": ("villa.inference.model", "PreparedImage"),
    "export_model": ("villa.inference.model", "export_model"),
    "predict_images": ("villa.inference.prediction", "predict_images"),
    "Visualizer": ("villa.inference.drawing", "Visualizer"),
    "VillaError": ("villa.storage.errors", "VillaError"),
    "VillaWarning": ("villa.storage.errors", "VillaWarning"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'villa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
