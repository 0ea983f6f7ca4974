"""The config files (ml_collections). Installed as ``lut_jax.configs``: see setup.py."""
