"""Models: timm's factory plus our small CPU nets registered in its registry."""

from imgtrain.models.create import (
    LogitOffset,
    ModelError,
    check_input_size,
    count_parameters,
    create_model,
    list_models,
)
from imgtrain.models.nets import OUR_MODELS, SmallConvNet

__all__ = ["LogitOffset", "ModelError", "check_input_size", "count_parameters", "create_model", "list_models",
           "OUR_MODELS", "SmallConvNet"]
