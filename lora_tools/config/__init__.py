"""Reading a config (YAML + overrides), its typed settings, .env secrets, and the checks run before weights load."""
