"""Models: timm's factory plus our small CPU nets registered in its registry."""

from imgtrain.models.create import ModelError, count_parameters, create_model, list_models
from imgtrain.models.nets import OUR_MODELS, SmallConvNet

__all__ = ["ModelError", "count_parameters", "create_model", "list_models", "OUR_MODELS", "SmallConvNet"]
