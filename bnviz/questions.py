"""The learners' questions (ids from LEARNER_QUESTIONS.md) and the chapter that answers each.

Each id appears as an HTML anchor (``<a id="q-..."></a>``) in a markdown cell of exactly one
notebook; ``notebooks/00_start_here.ipynb`` lists them and ``tests/test_notebooks.py`` checks
that every anchor is where this table says.
"""

QUESTIONS: dict[str, tuple[str, str]] = {
    # id: (notebook file, the question in a few words)
    "q-conv-bn": ("01_batch_norm_from_scratch.ipynb", "How is BN applied to a convolutional layer?"),
    "q-gamma-beta-update": ("01_batch_norm_from_scratch.ipynb", "How are γ and β updated?"),
    "q-momentum-convention": ("01_batch_norm_from_scratch.ipynb", "Why do momentum conventions differ between frameworks?"),
    "q-mode-detection": ("01_batch_norm_from_scratch.ipynb", "model.eval() or torch.is_grad_enabled(): who decides the mode?"),
    "q-data-attr": ("01_batch_norm_from_scratch.ipynb", "Is .data needed? Buffers, parameters, state_dict and .to()"),
    "q-moving-average": ("04_training_vs_prediction.ipynb", "Why a moving average instead of whole-data statistics?"),
    "q-train-vs-test": ("04_training_vs_prediction.ipynb", "How does BN differ between training and prediction?"),
    "q-test-batch-size": ("04_training_vs_prediction.ipynb", "How should the test batch size be chosen?"),
    "q-test-set-stats": ("04_training_vs_prediction.ipynb", "Could test-set statistics help under domain shift?"),
    "q-unbiased-var": ("04_training_vs_prediction.ipynb", "Biased or unbiased variance in running_var?"),
    "q-batch-one": ("04_training_vs_prediction.ipynb", "What happens with batch size 1?"),
    "q-fold": ("04_training_vs_prediction.ipynb", "Can BN be folded into the previous layer for inference?"),
    "q-batch-size": ("07_batches.ipynb", "Why does the batch size matter more with BN?"),
    "q-small-batch": ("07_batches.ipynb", "Is BN still effective with batches of 8-16?"),
    "q-lr-compare": ("05_optimisation.ipynb", "Compare learning rates with and without BN"),
    "q-max-lr": ("05_optimisation.ipynb", "What defines a maximum learning rate?"),
    "q-why-helps": ("05_optimisation.ipynb", "Why does BN help, and allow higher learning rates?"),
    "q-gpu-not-learning": ("05_optimisation.ipynb", "My model can't learn: how to tell and why?"),
    "q-where": ("06_architecture.ipynb", "Where does BN go: before or after the activation? And dropout?"),
    "q-bias": ("06_architecture.ipynb", "Can the bias before BN be removed?"),
    "q-every-layer": ("06_architecture.ipynb", "Is BN needed in every layer?"),
    "q-dropout": ("06_architecture.ipynb", "Can BN replace dropout?"),
    "q-fixed-gamma-beta": ("06_architecture.ipynb", "What if γ and β are fixed?"),
    "q-pooling-confound": ("06_architecture.ipynb", "Was part of the BN gain due to max pooling?"),
    "q-padding": ("06_architecture.ipynb", "Does the missing padding=2 matter?"),
    "q-smaller-net": ("06_architecture.ipynb", "A smaller net did better: try architecture changes"),
    "q-residual": ("06_architecture.ipynb", "Do deep plain networks train without BN?"),
    "q-other-norms": ("07_batches.ipynb", "Layer, instance, group norm and a 'lite' BN"),
}
