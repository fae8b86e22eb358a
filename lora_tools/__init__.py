"""Pieces shared by this project's recipes and scripts: settings from .env, one-line errors, config checks,
data preparation (per-sample label shift before packing) and the tiny offline assets."""
