"""The ops: where each computation picks its backend.

Data flows one way: a public function (``rcpo_losses.mnl``, ``.mallows``, ``.tokens``,
``.fused_linear``) checks its inputs and calls an op here; the op asks
:mod:`rcpo_losses.ops.backend` and runs either the Triton kernel of ``rcpo_losses.kernels``
(registered as a ``torch.library`` custom op) or its PyTorch twin in
:mod:`rcpo_losses.reference`.

- :mod:`~rcpo_losses.ops.choice`: MNL and Mallows-RMJ per-row losses (``rcpo_losses.kernels.mnl``, ``.mallows``);
- :mod:`~rcpo_losses.ops.token_stats`: per-token log-prob and entropy (``rcpo_losses.kernels.token_stats``);
- :mod:`~rcpo_losses.ops.fused_linear`: the same from hidden states and the LM head, chunk by chunk.
"""
