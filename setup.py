"""unilm_vl: a fairseq plugin for Kosmos-2, COSA and the CLIP / self-distillation family.

Dependencies are pinned and installed by scripts/install.sh (fairseq-fixed and torchscale need
--no-build-isolation / --no-deps, which install_requires cannot express).
"""
from setuptools import find_packages, setup

setup(
    name="unilm_vl",
    version="0.1.0",
    description="Vision-language models (Kosmos-2, COSA, CLIP family) as one fairseq plugin",
    packages=find_packages(include=["unilm_vl", "unilm_vl.*"]),
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "unilm-vl-train=unilm_vl.train:cli_main",
            "unilm-vl-generate=unilm_vl.generate:cli_main",
        ]
    },
)
