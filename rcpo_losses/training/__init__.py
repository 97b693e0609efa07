"""Training: from ranked rows and models to a trained model.

The top layer. It imports the token statistics (``rcpo_losses.tokens``) and the choice losses; nothing
below imports it (the package ``rcpo_losses`` re-exports ``response_stats`` and
``precompute_reference_stats``). Each module imports transformers, accelerate or peft inside its
functions, except the trainers, which are ``transformers.Trainer`` subclasses.

- :mod:`rcpo_losses.training.data`: ranked rows to tensors (``RankedPreferenceCollator``), padded or prefix-shared;
- :mod:`rcpo_losses.training.packing`: the prefix-shared layout (one prompt, its completions after it);
- :mod:`rcpo_losses.training.segment_attention`: attention per segment of a packed sequence on the CPU;
- :mod:`rcpo_losses.training.model_stats`: a model's ``[B, S]`` statistics of a batch (``response_stats``);
- :mod:`rcpo_losses.training.precompute`: the reference's statistics once, as columns of the dataset;
- :mod:`rcpo_losses.training.generate`: sample, score and rank completions (``rank_completions``, a CLI);
- :mod:`rcpo_losses.training.reference_model`: the reference model placed and prepared like the policy;
- :mod:`rcpo_losses.training.trainer`: ``RCPOTrainer``, a ``transformers.Trainer`` subclass;
- :mod:`rcpo_losses.training.online`: ``OnlineRCPOTrainer``: the policy's own samples, ranked at every step.
"""
