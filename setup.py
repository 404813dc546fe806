from setuptools import setup

setup(
    name="tritongpt",
    version="0.1.0",
    description="Fused Triton kernels for GPT-2 training, checked against PyTorch references",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=["kernels", "model", "data", "trainer"],
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "numpy", "tiktoken", "safetensors", "huggingface_hub"],
    extras_require={
        # transformers is used only in tests: real Hugging Face checkpoints, and kernels.patch on its GPT-2.
        "test": ["pytest", "pytest-benchmark", "matplotlib", "transformers"],
        "bench": ["matplotlib", "pytest-benchmark"],
    },
)
