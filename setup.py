"""nnunetv2_dram: weakly supervised lesion segmentation (dense regression activation maps) inside nnU-Net v2."""
from pathlib import Path

from setuptools import setup, find_packages

HERE = Path(__file__).parent

setup(
    name="nnunetv2_dram",
    version="0.8.0",
    description="Dense regression activation maps (dRAM) for nnU-Net v2: lesion segmentation from per-lobe "
                "lesion percentages or CT severity scores",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # `trainers/` is the folder nnU-Net scans through nnUNet_extTrainer. It is installed as
    # nnunetv2_dram/ext_trainers so that a non-editable install carries it too;
    # `nnunetv2_dram trainers-path` prints wherever it ended up.
    packages=find_packages(include=["nnunetv2_dram", "nnunetv2_dram.*"])
    + ["nnunetv2_dram.ext_trainers", "nnunetv2_dram.ext_trainers.variants"],
    package_dir={"nnunetv2_dram.ext_trainers": "trainers", "nnunetv2_dram.ext_trainers.variants": "trainers/variants"},
    include_package_data=True,
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "torch>=2.1",
        "SimpleITK>=2.2",
        "batchgenerators>=0.25",
        "numpy>=1.24",
        "scipy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # pydensecrf 1.0rc3 does not build under Cython 3; pydensecrf2 builds and imports as `pydensecrf`.
        "crf": ["pydensecrf2==1.1"],
        "test": ["pytest>=7"],
    },
    entry_points={"console_scripts": ["nnunetv2_dram=nnunetv2_dram.cli:main"]},
)
