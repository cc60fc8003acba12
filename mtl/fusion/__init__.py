"""AdapterFusion (Pfeiffer et al. 2021): attention over several adapters' outputs, AdapterHub-compatible."""

from mtl.fusion.config import FusionConfig, as_fusion_config
from mtl.fusion.layer import FusionLayer

__all__ = ["FusionConfig", "FusionLayer", "as_fusion_config"]
