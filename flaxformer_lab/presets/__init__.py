"""Model and training presets, one module per family (`get_config(arg)`); `configs/` re-exports them."""
