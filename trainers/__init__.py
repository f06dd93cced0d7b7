"""The folder nnU-Net scans for our trainers (`export nnUNet_extTrainer=$(nnunetv2_dram trainers-path)`).

Each module is a thin re-export that imports nothing heavy beyond nnU-Net itself, so nnU-Net's search
(which imports every module here) cannot break on it.
"""
