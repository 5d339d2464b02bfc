"""ViLLA: vision-language learning with attributes (ICCV 2023), re-created and extended.

The public API for using a trained model (imported on first use, so ``import villa`` stays light):

- :func:`villa.load` -> :class:`villa.Model`: ``encode_text``, ``encode_regions``, ``ground``, ``heatmaps``
  (:mod:`villa.inference`)
- :func:`villa.export_model`: a self-contained model folder (:mod:`villa.model_folder`)
- :func:`villa.predict_images`: ground queries in many images and write predictions (:mod:`villa.prediction`)
- :class:`villa.Visualizer`: draw boxes and heatmaps (:mod:`villa.drawing`)
"""

__version__ = "0.1.0"

#: public name -> (module, attribute), imported when first asked for
_LAZY = {
    "load": ("villa.inference", "load"),
    "Model": ("villa.inference", "Model"),
    "PreparedImage": ("villa.inference", "PreparedImage"),
    "export_model": ("villa.model_folder", "export_model"),
    "predict_images": ("villa.prediction", "predict_images"),
    "Visualizer": ("villa.drawing", "Visualizer"),
    "VillaError": ("villa.errors", "VillaError"),
    "VillaWarning": ("villa.errors", "VillaWarning"),
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
