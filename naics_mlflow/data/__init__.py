"""Census files, the NAICS tree, curricula and the Lightning data module."""
