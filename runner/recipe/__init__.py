"""The recipe: its schema, loading (extends, overrides, sourced paths), the shipped data files and
the metric names gates use. Host side only; nothing here runs a step."""
