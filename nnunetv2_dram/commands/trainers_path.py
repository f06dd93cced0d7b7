"""Print the folder that nnU-Net must scan for our trainers:  export nnUNet_extTrainer=$(nnunetv2_dram trainers-path)"""


def add_arguments(parser):
    pass


def run(args) -> int:
    from nnunetv2_dram.paths import trainers_path
    print(trainers_path())
    return 0
