"""Trainer variants for experiments (nnU-Net searches this folder too); users choose from the trainers one level up."""
