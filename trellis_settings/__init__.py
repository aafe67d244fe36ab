"""One configuration system for every Trellis process: a typed settings model per process (pydantic), filled
from command-line flags > environment variables > a TOML file (`--config`) > the model's defaults, each value's
source remembered for `--print-config` and the start-up log line."""

from trellis_settings.fields import Section, setting
from trellis_settings.layers import Loaded, SettingsError, load
from trellis_settings.parser import Configured, configure

__all__ = ["Configured", "Loaded", "Section", "SettingsError", "configure", "load", "setting"]
