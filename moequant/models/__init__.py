from .adapter import (DEFAULT_TARGETS, SUPPORTED_MODEL_TYPES, ModelAdapter, MoEBlock, UnsupportedModelError,
                      get_adapter)
from .configs import real_config, tiny_config
