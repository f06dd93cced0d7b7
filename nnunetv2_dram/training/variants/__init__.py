"""Trainer variants for experiments: one axis per module, each a tiny subclass of a trainer users choose from."""
