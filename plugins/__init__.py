"""Built-in plugins. Each module is one training or evaluation method; see lab.plugins for the contract."""
