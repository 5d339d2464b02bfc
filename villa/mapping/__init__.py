"""Stage 1 of ViLLA: the self-supervised mapping model and region-attribute assignment (docs/method.md section 4).

- :mod:`villa.mapping.model`   MappingModel: K projection heads run as one batched op
- :mod:`villa.mapping.loss`    the max-over-regions InfoNCE loss
- :mod:`villa.mapping.data`    in-memory stage-1 dataset (packed region embeddings + multi-hot)
- :mod:`villa.mapping.assign`  region-attribute assignment and per-region assigned text
- :mod:`villa.mapping.metrics` precision / recall / F1 against ground truth (evaluation only)
- :mod:`villa.mapping.schema`  THE reader/writer of ``mapping_{split}.feather`` and ``mapping_metrics.json``
- :mod:`villa.mapping.run`     run_stage1: train, map every split, write outputs
"""

from villa.mapping.model import MappingModel
from villa.mapping.schema import read_mapping, read_mapping_metrics, write_mapping, write_mapping_metrics

__all__ = ["MappingModel", "read_mapping", "read_mapping_metrics", "write_mapping", "write_mapping_metrics"]
