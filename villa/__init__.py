"""ViLLA: vision-language learning with attributes (ICCV 2023), re-created and extended."""

__version__ = "0.1.0"
