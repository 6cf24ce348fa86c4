"""Built-in device profiles: one YAML file each, loaded by edgekit.profiles."""
