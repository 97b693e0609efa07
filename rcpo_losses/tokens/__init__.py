"""Token statistics: from logits or hidden states to per-token and per-response log-probs and entropies.

The layer between the choice losses (``rcpo_losses.mnl``, ``rcpo_losses.mallows``, which take ``[B, S]``
tensors) and training (``rcpo_losses.training``, which runs models). It imports the choice-loss layer
(``dispersion``, ``ranks``, ``checks``) and the kernels' ops, never the training layer.

- :mod:`rcpo_losses.tokens.stats`: per-token log-prob and entropy from logits, summed per response;
- :mod:`rcpo_losses.tokens.fused_linear`: the same straight from hidden states and the LM head weight;
- :mod:`rcpo_losses.tokens.vocab_parallel`: the exact combine across a vocabulary-parallel head;
- :mod:`rcpo_losses.tokens.lm_head`: a Hugging Face model's head and logit transform, checked once.
"""
