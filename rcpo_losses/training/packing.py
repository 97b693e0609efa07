"""The prefix-shared packed layout of a ranked batch: each prompt once, its completions after it, no padding.

All rows of a batch go into one sequence (batch size 1)::

    [ prompt_0 | y_00 | y_01 | y_02 | prompt_1 | y_10 | y_11 ]

A completion token attends to its own prompt and, causally, to the earlier tokens of its
own completion; never to a sibling completion or another row. Position ids restart at the
prompt's length for every completion, so each completion sees exactly the positions, keys
and values it would see alone after its prompt. The first token of every completion is
predicted from the prompt's last position (one hidden row serves ``S`` targets), so the
targets are gathered by index, not by shifting labels. A completion's last token is fed too,
though no target reads its hidden state: the longest position id is then the padded
layout's longest sequence less one, which a RoPE whose scaling follows the sequence length
(longrope, dynamic NTK) reads.

The attention structure is three per-position vectors (``row_index``, ``response_index``,
``position_ids``) and one rule, :func:`prefix_shared_mask_mod`; :func:`dense_attention_mask`
(the 4D mask for ``sdpa`` / ``eager`` attention) and :func:`flex_block_mask` (a FlexAttention
``BlockMask``, which skips the masked blocks) are both built from that rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# Keys of a packed batch (besides "ranks"); a batch with "target_index" is prefix-shared.
PACKED_KEYS = (
    "input_ids",
    "position_ids",
    "row_index",
    "response_index",
    "target_index",
    "target_ids",
    "target_response",
)


def is_prefix_shared(batch) -> bool:
    """Whether ``batch`` is in the prefix-shared packed layout (it has ``target_index``), not ``[B, S, L]``."""
    return "target_index" in batch


def pack_prefix_shared(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[Sequence[int]]], num_responses: int
) -> dict[str, Tensor]:
    """Pack ``B`` prompts and their completions into one prefix-shared sequence of ``P`` positions.

    Row ``b`` contributes ``len(prompts[b]) + sum_j len(completions[b][j])`` positions: its
    prompt, then each completion (the last token's hidden state predicts nothing; it is fed so that
    the positions reach the padded layout's length). Completion ``j`` of row ``b`` is
    response ``b * num_responses + j`` of the ``[B, S]`` grid; slots ``j >= len(completions[b])``
    get no tokens (and so no targets).

    Returns a dict of int64 tensors:
        - ``input_ids``, ``position_ids``: ``(1, P)``; positions count from 0 at each prompt, and
          from the prompt's length at each of its completions.
        - ``row_index``: ``(1, P)``, the row ``b`` of each position.
        - ``response_index``: ``(1, P)``, the completion ``j`` of each position, -1 on prompt tokens.
        - ``target_index``: ``(N,)``, the position whose hidden state predicts each completion token
          (``N`` = all completion tokens); ``target_ids``: ``(N,)`` the token;
          ``target_response``: ``(N,)`` its response ``b * S + j``.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"completions: {len(completions)} rows for {len(prompts)} prompts")
    S = num_responses
    ids: list[int] = []
    pos: list[int] = []
    row: list[int] = []
    resp: list[int] = []
    t_index: list[int] = []
    t_ids: list[int] = []
    t_resp: list[int] = []
    for b, (prompt, outs) in enumerate(zip(prompts, completions, strict=True)):
        P = len(prompt)
        if P == 0:
            raise ValueError(f"prompts: row {b} is empty (its last token predicts the first completion token)")
        if len(outs) > S:
            raise ValueError(f"completions: row {b} has {len(outs)} completions, more than num_responses = {S}")
        ids += prompt
        pos += range(P)
        row += [b] * P
        resp += [-1] * P
        last = len(ids) - 1
        for j, c in enumerate(outs):
            if not c:
                raise ValueError(f"completions: row {b}, completion {j} is empty")
            start = len(ids)
            ids += c
            pos += range(P, P + len(c))
            row += [b] * len(c)
            resp += [j] * len(c)
            t_index += [last, *range(start, start + len(c) - 1)]
            t_ids += c
            t_resp += [b * S + j] * len(c)

    def vec(x: list[int]) -> Tensor:
        return torch.tensor(x, dtype=torch.int64)

    return {
        "input_ids": vec(ids)[None],
        "position_ids": vec(pos)[None],
        "row_index": vec(row)[None],
        "response_index": vec(resp)[None],
        "target_index": vec(t_index),
        "target_ids": vec(t_ids),
        "target_response": vec(t_resp),
    }


def prefix_shared_mask_mod(
    row_index: Tensor,
    response_index: Tensor,
    position_ids: Tensor,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
) -> Callable:
    r"""The attention rule of the packed sequence, as a FlexAttention ``mask_mod(b, h, q, kv) -> bool``.

    .. math::
        \text{attend}(q, k) = [r_q = r_k] \wedge [k \le q] \wedge ([j_k = -1] \vee [j_k = j_q])
        \wedge [p_q - p_k < w] \wedge [\lfloor p_q / c \rfloor = \lfloor p_k / c \rfloor]

    with ``r`` the row, ``j`` the completion (-1 on the prompt), ``p`` the position id, ``w``
    the sliding window and ``c`` the attention chunk (Llama-4's ``attention_chunk_size``); no
    window or chunk term when None. ``k <= q`` with the same row and ``j_k = -1``
    is the prompt; with ``j_k = j_q`` the completion's earlier tokens. The window is on position
    ids, the distance the tokens have in the padded layout (Hugging Face's
    ``sliding_window_overlay``: ``k > q - w``), and so are the chunks (its ``chunked_overlay``
    counts them from the first non-padding token, position 0).

    Shape:
        - row_index, response_index, position_ids: ``(P,)`` or ``(1, P)``; ``q`` and ``kv`` index them
          (broadcasting tensors give the dense mask, see :func:`dense_attention_mask`).
    """
    r, j, p = (x.reshape(-1) for x in (row_index, response_index, position_ids))

    def mask_mod(b, h, q, kv):
        allowed = (r[q] == r[kv]) & (kv <= q) & ((j[kv] < 0) | (j[kv] == j[q]))
        if sliding_window is not None:
            allowed = allowed & (p[q] - p[kv] < sliding_window)
        if chunk_size is not None:
            allowed = allowed & (p[q] // chunk_size == p[kv] // chunk_size)
        return allowed

    return mask_mod


def _rule(batch, sliding_window: int | None, chunk_size: int | None) -> Callable:
    return prefix_shared_mask_mod(
        batch["row_index"], batch["response_index"], batch["position_ids"], sliding_window, chunk_size
    )


def dense_attention_mask(
    batch, *, sliding_window: int | None = None, chunk_size: int | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """The ``(1, 1, P, P)`` attention mask of a packed batch: bool (True: attend), or additive in ``dtype``.

    ``dtype`` given: 0 where attended and ``torch.finfo(dtype).min`` elsewhere, the form eager
    attention adds to its scores (as Hugging Face's ``eager_mask``); None: bool, as its ``sdpa_mask``.
    Quadratic in ``P``: ``P^2`` bytes (bool) or ``P^2 * itemsize``.
    """
    rule = _rule(batch, sliding_window, chunk_size)
    P = batch["input_ids"].shape[-1]
    idx = torch.arange(P, device=batch["input_ids"].device)
    allowed = rule(0, 0, idx[:, None], idx[None, :])[None, None]
    if dtype is None:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def flex_block_mask(batch, *, sliding_window: int | None = None, chunk_size: int | None = None, block_size: int = 128):
    """A FlexAttention ``BlockMask`` ``(1, 1, P, P)`` of the packed batch's attention rule, on its device.

    Built by ``torch.nn.attention.flex_attention.create_block_mask`` from
    :func:`prefix_shared_mask_mod`: blocks with no attended pair are skipped by the kernel, so
    the cost follows the attended pairs (each prompt with itself and each completion with its
    prompt and itself), not ``P^2``.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    ids = batch["input_ids"]
    rule = _rule(batch, sliding_window, chunk_size)
    P = ids.shape[-1]
    # compiled on CUDA: uncompiled, it evaluates the rule on all P^2 pairs at once (GBs at P = 30k)
    return create_block_mask(rule, 1, None, P, P, device=ids.device, BLOCK_SIZE=block_size, _compile=ids.is_cuda)


def attended_pairs(batch) -> int:
    """How many ``(q, k)`` pairs the packed batch's attention rule allows (no window): the work FlexAttention does.

    Per row with prompt length ``n`` and completion inputs ``m_j``:
    ``n (n + 1) / 2 + sum_j (m_j n + m_j (m_j + 1) / 2)``.
    """
    row, resp = batch["row_index"].reshape(-1), batch["response_index"].reshape(-1)
    total = 0
    for b in row.unique().tolist():
        in_row = resp[row == b]
        n = int((in_row < 0).sum())
        total += n * (n + 1) // 2
        for m in torch.bincount(in_row[in_row >= 0]).tolist():
            total += m * n + m * (m + 1) // 2
    return total
