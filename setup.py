from setuptools import setup

# The repository keeps one folder per part (kernels/, model/, ...); installed, they are the
# subpackages of `tritongpt`, the project's only top-level name (`kernels`, `data` or `model` at the
# top of site-packages would collide with other packages, Hugging Face's `kernels` among them).
PARTS = ["kernels", "model", "data", "trainer", "bench"]
TRANSFORMERS = "transformers>=4.55"  # the first release whose GPT-2 builds masks through AttentionMaskInterface

setup(
    name="tritongpt",
    version="0.2.0",
    description="Fused Triton kernels for GPT-2 training, checked against PyTorch references",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=["tritongpt"] + [f"tritongpt.{part}" for part in PARTS],
    package_dir={"tritongpt": "tritongpt", **{f"tritongpt.{part}": part for part in PARTS}},
    python_requires=">=3.10",
    # tqdm and matplotlib: the demo's progress bar and its loss.png, from the first command on.
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "tiktoken", "safetensors", "huggingface_hub", "tqdm",
                      "matplotlib"],
    extras_require={
        # tritongpt.kernels.patch and the "tritongpt" attention implementation (kernels/hf.py);
        # .ci/run tests the oldest release named here and the newest one available.
        "hf": [TRANSFORMERS],
        # Hugging Face's own `kernels` package is installed in tests to show both import side by side.
        "test": ["pytest", "pytest-benchmark", "matplotlib", TRANSFORMERS, "kernels", "hypothesis"],
        "bench": ["matplotlib", "pytest-benchmark"],
    },
)
