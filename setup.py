from setuptools import find_packages, setup

setup(
    name="multitask-nnunet",
    version="0.1.0",
    description="Multi-task (segmentation + case-level classification) plugin for nnU-Net v2",
    long_description=open("README.md").read() if __import__("os").path.isfile("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["multitask_nnunet", "multitask_nnunet.*"]),
    python_requires=">=3.10",
    install_requires=[
        "nnunetv2>=2.8",
        # unpinned on purpose: pip resolves the build that matches the machine (see README)
        "torch",
        "dynamic-network-architectures",
        "batchgenerators",
        "SimpleITK",
        "nibabel",
        "numpy",
        "scikit-learn",
        "matplotlib",
        "tqdm",
    ],
    # serve: the HTTP service (multitask-nnunet serve); pillow draws the viewer's slices (matplotlib needs it too)
    extras_require={"serve": ["fastapi", "uvicorn", "python-multipart", "pillow"],
                    "test": ["pytest", "fastapi", "uvicorn", "python-multipart", "pillow", "requests", "selenium"]},
    package_data={"multitask_nnunet.serve": ["static/*"]},
    entry_points={"console_scripts": ["multitask-nnunet=multitask_nnunet.cli:main"]},
)
