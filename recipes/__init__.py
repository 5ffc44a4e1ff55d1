"""Built-in build recipes (one YAML file per recipe), shipped as ``omni_export.builtin_recipes``."""
