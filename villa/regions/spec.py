"""Region specs: the one text form every command uses to say where an image's regions come from.

==================== ===================================================================================
``boxes``            the boxes the data gives (annotation boxes, a boxes file)
``grid:RxC``         R x C equal cells, row by row (``grid:3x3``)
``proposals[:K]``    the top K boxes of the region proposer (:mod:`villa.regions.proposals`); K defaults to
                     :data:`~villa.regions.proposals.DEFAULT_MAX_PROPOSALS`
==================== ===================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from villa.storage.errors import VillaError

KINDS = ("boxes", "grid", "proposals")
#: the largest grid side and proposal count a spec accepts
MAX_GRID_SIDE = 64
MAX_PROPOSALS = 1000


@dataclass(frozen=True)
class RegionSpec:
    """A parsed region spec (see the module docstring). ``rows``/``cols`` for a grid, ``max_regions`` for
    proposals."""

    kind: str
    rows: int = 0
    cols: int = 0
    max_regions: int = 0

    def __str__(self) -> str:
        if self.kind == "grid":
            return f"grid:{self.rows}x{self.cols}"
        if self.kind == "proposals":
            return f"proposals:{self.max_regions}"
        return self.kind

    def for_files(
        self, paths, sizes, *, strict: bool = True, progress: bool = True
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """This spec's regions on many image files: per image ``(boxes [M, 4] float32, objectness [M] or None)``
        in stored pixels. ``sizes``: ``[N, 2]`` (height, width) of the files. Proposals read the images (a
        process pool, :func:`villa.regions.propose_for_files`) and carry the proposer's scores; a grid needs only
        the sizes and has none. ``strict``: an image too small for any proposal is a one-line error naming it
        (else it gets no region)."""
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        if self.kind == "grid":
            return [(self.boxes_for(size=(int(h), int(w))), None) for h, w in sizes]
        if self.kind != "proposals":
            raise ValueError("a 'boxes' spec has no boxes of its own: the data gives them")
        from villa.regions.proposals import propose_for_files, smallest_image_side

        out = []
        for path, (h, w), found in zip(
            paths, sizes, propose_for_files(paths, self.max_regions, progress=progress)
        ):
            if isinstance(found, str):
                raise VillaError(found)
            if strict and len(found.boxes) == 0:
                raise VillaError(
                    f"image {path} is {int(w)}x{int(h)} pixels: too small for any region proposal (both sides must "
                    f"be at least {smallest_image_side()}); use --regions=grid:RxC or give boxes"
                )
            out.append((found.boxes, found.scores.astype(np.float64)))
        return out

    def boxes_for(self, image: np.ndarray | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
        """This spec's boxes ``[M, 4]`` (float32) for one image: ``image`` uint8 ``[H, W, 3]`` (proposals need
        the pixels) or just its ``size`` (height, width) for a grid. ``boxes`` has none to compute."""
        if self.kind == "grid":
            height, width = size if size is not None else image.shape[:2]
            return np.asarray(grid_boxes(self, int(height), int(width)), dtype=np.float32).reshape(-1, 4)
        if self.kind == "proposals":
            from villa.regions.proposals import propose_regions

            if image is None:
                raise ValueError("proposals need the image's pixels")
            return propose_regions(image, self.max_regions).boxes
        raise ValueError("a 'boxes' spec has no boxes of its own: the data gives them")


def parse_region_spec(
    spec: str | RegionSpec, allowed: tuple[str, ...] = KINDS, what: str = "--regions"
) -> RegionSpec:
    """``"grid:3x3"``, ``"proposals"``, ``"proposals:50"`` or ``"boxes"`` -> :class:`RegionSpec`; anything
    else (or a kind not in ``allowed``) is a one-line :class:`VillaError` naming the accepted forms."""
    from villa.regions.proposals import DEFAULT_MAX_PROPOSALS

    if isinstance(spec, RegionSpec):
        parsed = spec
    else:
        text = str(spec).strip().lower()
        head, sep, body = text.partition(":")
        parsed = None
        if head == "boxes" and not sep:
            parsed = RegionSpec("boxes")
        elif head == "grid" and sep:
            parts = body.split("x")
            if len(parts) == 2 and all(p.isdigit() and 0 < int(p) <= MAX_GRID_SIDE for p in parts):
                parsed = RegionSpec("grid", rows=int(parts[0]), cols=int(parts[1]))
        elif head == "proposals":
            if not sep:
                parsed = RegionSpec("proposals", max_regions=DEFAULT_MAX_PROPOSALS)
            else:
                try:
                    k = int(body)
                except ValueError:
                    k = None
                if k is not None and k <= 0:
                    raise VillaError(f"{what}={spec}: the number of proposals must be at least 1")
                if k is not None and k > MAX_PROPOSALS:
                    raise VillaError(f"{what}={spec}: at most {MAX_PROPOSALS} proposals per image")
                if k is not None:
                    parsed = RegionSpec("proposals", max_regions=k)
        if parsed is None:
            raise VillaError(f"unknown {what} spec '{spec}': {_forms(allowed)}")
    if parsed.kind not in allowed:
        raise VillaError(f"{what}={spec} is not accepted here: {_forms(allowed)}")
    return parsed


def _forms(allowed: tuple[str, ...]) -> str:
    forms = {
        "boxes": "boxes",
        "grid": "grid:RxC (e.g. grid:3x3)",
        "proposals": "proposals[:K] (e.g. proposals:30)",
    }
    return "use " + " or ".join(forms[k] for k in KINDS if k in allowed)


def grid_boxes(spec: str | RegionSpec, height: int, width: int) -> list[list[float]]:
    """The cells of ``grid:RxC`` on an image of ``height x width``, row by row."""
    parsed = parse_region_spec(spec, ("grid",))
    ys = np.linspace(0, height, parsed.rows + 1)
    xs = np.linspace(0, width, parsed.cols + 1)
    return [
        [float(xs[c]), float(ys[r]), float(xs[c + 1]), float(ys[r + 1])]
        for r in range(parsed.rows)
        for c in range(parsed.cols)
    ]
