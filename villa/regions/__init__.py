"""Regions: where an image's candidate boxes come from.

- :mod:`villa.regions.spec`      the region specs every command accepts: ``boxes``, ``grid:RxC``, ``proposals[:K]``
- :mod:`villa.regions.proposals` the region proposer: candidate object boxes from pixels, no weights, CPU
- :mod:`villa.regions.boxes`     IoU, clipping and non-maximum suppression
"""

from villa.regions.boxes import box_iou, clip_boxes, nms
from villa.regions.proposals import DEFAULT_MAX_PROPOSALS, Proposals, propose_for_files, propose_regions
from villa.regions.spec import RegionSpec, grid_boxes, parse_region_spec

__all__ = [
    "DEFAULT_MAX_PROPOSALS",
    "Proposals",
    "RegionSpec",
    "box_iou",
    "clip_boxes",
    "grid_boxes",
    "nms",
    "parse_region_spec",
    "propose_for_files",
    "propose_regions",
]
