"""Configuration: the validated model (``model``) and the file loader (``load``)."""

from ferryman.config.load import load_config, load_config_text
from ferryman.config.model import Config, ListenerConfig

__all__ = ["Config", "ListenerConfig", "load_config", "load_config_text"]
