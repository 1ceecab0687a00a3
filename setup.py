"""dapple-tf: hybrid pipeline + data parallel training for TensorFlow, planned automatically."""

from setuptools import find_packages, setup

setup(
    name="dapple-tf",
    version="0.1.0",
    description="DAPPLE-style planned hybrid pipeline/data parallel training for TensorFlow",
    python_requires=">=3.11",
    packages=find_packages(include=["dapple_tf*", "graph_rewrite*", "planner*", "models*"]),
    py_modules=["train"],
    install_requires=["numpy", "absl-py"],
    # TF1 model code using tf.compat.v1.layers.* needs Keras 2 under TF 2.21 (run it with
    # TF_USE_LEGACY_KERAS=1); see docs/tf1-models.md. Not part of the default install.
    extras_require={"keras2": ["tf-keras>=2.21,<2.22"]},
    entry_points={
        "console_scripts": [
            "dapple-train=train:entry_point",
            "dapple-plan=planner.__main__:main",
        ],
    },
)
