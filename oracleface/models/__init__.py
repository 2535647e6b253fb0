"""The networks of the paper: generator (Tables 6/8), discriminators (Tables 7/9), CA baseline."""
from oracleface.models.contextual_attention import ContextualAttention
from oracleface.models.discriminators import (
    DISCRIMINATOR_NAMES,
    MultiDiscriminator,
    PatchDiscriminator,
    crop_and_resize,
    discriminator_layer_table,
    local_boxes,
)
from oracleface.models.generator import (
    Generator,
    GeneratorLayerSpec,
    batchnorm_statistics_frozen,
    generator_layer_table,
)

__all__ = [
    "ContextualAttention",
    "DISCRIMINATOR_NAMES",
    "Generator",
    "GeneratorLayerSpec",
    "MultiDiscriminator",
    "PatchDiscriminator",
    "batchnorm_statistics_frozen",
    "crop_and_resize",
    "discriminator_layer_table",
    "generator_layer_table",
    "local_boxes",
]
