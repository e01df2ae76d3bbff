"""The Backbone contract: a pretrained network seen as ``embed -> blocks -> finalize -> pool``.

Strategies never fork a model file; they compose these four pieces (VQT runs extra query tokens through each
block, SHERL reads ``hidden_states`` and re-runs the last blocks, LinearProbe calls ``forward``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_transfer._config import RecordsInitArgs
from lightning_transfer.checkpointing import read_weights
from lightning_transfer.outputs import BackboneOutput


class Backbone(nn.Module, RecordsInitArgs):
    """Base class for every backbone: tokens (or feature maps), blocks and metadata.

    Subclasses set ``embed_dim``, ``num_features``, ``num_prefix_tokens`` and ``name`` in ``__init__`` and implement
    :meth:`embed`, :attr:`blocks`, :meth:`finalize` and :meth:`pool`.
    """

    #: True when ``embed`` returns (B, N, D) tokens that blocks read (ViT, CLIP, BERT); False for CNN stages.
    has_tokens: ClassVar[bool] = True
    #: True when :meth:`run_block_with_queries` is implemented (extra query tokens, as VQT needs).
    supports_queries: ClassVar[bool] = False
    #: Parameter-name prefixes that belong after the last block (final norm, pooling norm).
    final_prefixes: ClassVar[tuple[str, ...]] = ()
    #: Module-name prefix of the tower that ``forward`` runs (CLIP's image tower: its text tower holds modules of
    #: the same names that no image strategy runs); ``""`` is the whole backbone.
    image_tower_prefix: ClassVar[str] = ""
    #: Whole components of parameter names that are never weight-decayed: learned tokens and position tables
    #: (timm's ``no_weight_decay()`` names, OpenAI's and Hugging Face's position tables, BERT's token-type table).
    no_weight_decay_names: ClassVar[frozenset[str]] = frozenset({
        "cls_token", "dist_token", "reg_token", "mask_token", "pos_embed", "positional_embedding",
        "position_embedding", "position_embeddings", "token_type_embeddings"})

    name: str = "backbone"
    embed_dim: int = 0
    num_features: int = 0
    num_prefix_tokens: int = 0

    # ---- the token contract -------------------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """Input -> tokens (B, N, D): patch/token embedding, prefix tokens, positions, pre-norm."""
        raise NotImplementedError

    @property
    def blocks(self) -> Sequence[nn.Module]:
        """The wrapped library's own block modules, in order (stages for CNNs)."""
        raise NotImplementedError

    def run_block(self, index: int, tokens: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Run block ``index`` on ``tokens``; ``attn_mask`` is passed to blocks that accept one."""
        if attn_mask is not None:
            raise ValueError(f"{type(self).__name__} blocks do not take an attention mask")
        return self.blocks[index](tokens)

    def run_block_with_queries(self, index: int, tokens: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        """Run block ``index`` on ``tokens`` (B, N, D) plus extra ``queries`` (B, T, D) that read the tokens.

        The queries attend to the original tokens only (not to themselves or each other) through the block's own
        frozen attention and MLP; the tokens never see the queries, so ``tokens_out`` is exactly what
        :meth:`run_block` computes. ``tokens_out`` is computed without gradient (nothing is recorded for backward
        on the token path); only ``queries_out`` (B, T, D) carries gradients, to ``queries`` and nothing else.
        This is what VQT (arXiv:2212.03220) needs. Backbones whose blocks take a padding mask (Hugging Face text
        encoders) also accept an optional ``attn_mask`` keyword, an additive key mask (B, 1, 1, N) applied to the
        token and the query rows alike; by default they use the padding mask of the last :meth:`embed`, as
        :meth:`run_block` does.

        Returns:
            ``(tokens_out, queries_out)``, both taken after the full block (residuals included, no final norm).
        """
        raise NotImplementedError(
            f"{type(self).__name__} ({self.identity()}) does not implement run_block_with_queries, so query-token "
            "methods (VQT) cannot run on it: use a timm Vision Transformer (TimmBackbone), a Hugging Face CLIP "
            "(HFCLIPBackbone) or BERT-family encoder (HFTextBackbone), or implement run_block_with_queries"
        )

    @torch.no_grad()
    def hidden_states(self, x: Tensor, num_blocks: int | None = None) -> tuple[Tensor, ...]:
        """Embedding output and the outputs of the first ``num_blocks`` blocks (default all), without gradient.

        ``[0]`` is the embedding output, ``[i]`` the output of block ``i - 1``; nothing is recorded for backward, so
        side-route methods (SHERL) read the frozen trunk at inference-time memory cost.
        """
        count = self.depth if num_blocks is None else num_blocks
        if not 0 <= count <= self.depth:
            raise ValueError(f"num_blocks must be in [0, {self.depth}] for {self.identity()}, got {num_blocks}")
        tokens = self.embed(x)  # (B, N, D)
        hidden = [tokens]
        for i in range(count):
            tokens = self.run_block(i, tokens)
            hidden.append(tokens)
        return tuple(hidden)

    def finalize(self, tokens: Tensor) -> Tensor:
        """Final norm after the last block (identity where the model has none)."""
        return tokens

    def pool(self, tokens: Tensor) -> Tensor:
        """Finalized tokens -> (B, num_features)."""
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def forward_tokens(self, x: Tensor, return_hidden_states: bool = False) -> BackboneOutput:
        tokens = self.embed(x)
        hidden: list[Tensor] = [tokens]
        for i in range(self.depth):
            tokens = self.run_block(i, tokens)
            if return_hidden_states:
                hidden.append(tokens)
        tokens = self.finalize(tokens)
        return BackboneOutput(self.pool(tokens), tokens, tuple(hidden) if return_hidden_states else None)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> pooled features (B, num_features)."""
        return self.forward_tokens(x).pooled

    # ---- metadata -----------------------------------------------------------------------------------------
    @property
    def lora_target_modules(self) -> list[str]:
        """Default module-name suffixes for LoRA (every one resolves to an ``nn.Linear``)."""
        return []

    def data_config(self) -> dict[str, Any]:
        """``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``, ``crop_pct``: what transforms need."""
        raise NotImplementedError

    def layer_ids(self) -> dict[str, int]:
        """Parameter name -> layer index: 0 = embedding, i + 1 = block i, depth + 1 = after the blocks.

        Used by layer-wise learning-rate decay and by PartialFreeze.
        """
        block_of: dict[int, int] = {}
        for i, block in enumerate(self.blocks):
            for p in block.parameters():
                block_of[id(p)] = i + 1
        ids = {}
        for name, p in self.named_parameters():
            if id(p) in block_of:
                ids[name] = block_of[id(p)]
            elif any(name.startswith(prefix) for prefix in self.final_prefixes):
                ids[name] = self.depth + 1
            else:
                ids[name] = 0
        return ids

    def unused_by_forward(self) -> tuple[str, ...]:
        """Parameter-name prefixes that :meth:`forward` never uses (a checkpoint's own classifier, CLIP's text tower).

        The module freezes them after the strategy attaches, unless the strategy uses the text tower: a trainable
        parameter without a gradient inflates the counts and the checkpoint, and stops DDP. Default: none.
        """
        return ()

    def identity(self) -> str:
        """A human-readable name of the weights this backbone was built from."""
        return self.name

    @property
    def random_init(self) -> bool:
        """True when the weights are a random initialisation (neither pretrained nor read from a file): a
        checkpoint that leaves them out cannot be reloaded, as no later run draws the same weights."""
        return False

    def export_state_dict(self) -> dict[str, Tensor]:
        """The weights in the layout ``checkpoint_path`` accepts."""
        return self.state_dict()


# ---- helpers for run_block_with_queries --------------------------------------------------------------------
KeysValues = Callable[[Tensor], tuple[Tensor, Tensor]]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H * d) -> (B, H, N, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H * d)."""
    return x.transpose(1, 2).flatten(2)


@contextmanager
def capture_outputs(*modules: nn.Module) -> Iterator[list[list[Tensor]]]:
    """Record what each of ``modules`` returns while the context is open: one list of outputs per module.

    Query paths read the keys and values that the plain block call computes anyway, instead of recomputing them.
    """
    outputs: list[list[Tensor]] = [[] for _ in modules]
    handles = [m.register_forward_hook(lambda _m, _i, out, box=box: box.append(out))
               for m, box in zip(modules, outputs)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def query_key_mask(attn_mask: Tensor | None, tokens: Tensor) -> Tensor | None:
    """Check that ``attn_mask`` is a key mask (B or 1, 1, 1, N) that the query rows can share with the tokens."""
    if attn_mask is None:
        return None
    if attn_mask.ndim != 4 or attn_mask.shape[-2] != 1 or attn_mask.shape[-1] != tokens.shape[1]:
        raise ValueError(f"query tokens take an additive key mask of shape (B, 1, 1, {tokens.shape[1]}) (padding "
                         f"only: a query row has no place in an (N, N) mask), got {tuple(attn_mask.shape)}")
    return attn_mask


class _AttendToTokens(torch.autograd.Function):
    """Attention of query rows over frozen keys/values that saves the block input, not the keys and values.

    Saving k and v would keep 2 x (B, H, N, d) per block; the block input (B, N, D) is half that, and backward
    recomputes k and v from it (one extra key/value projection per block). The (B, H, T, N) attention weights of
    the query rows are recomputed too. Backward runs under the forward's autocast state (mixed precision), so the
    recomputed keys and values have the dtypes the forward used.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, tokens: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None,
                keys_values: KeysValues, scale: float) -> Tensor:
        device = q.device.type
        ctx.keys_values, ctx.scale = keys_values, scale
        ctx.autocast = device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)
        ctx.save_for_backward(q, tokens, key_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=scale)  # (B, H, T, d)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, tokens, key_mask = ctx.saved_tensors
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            with torch.no_grad():
                k, v = ctx.keys_values(tokens)
            with torch.enable_grad():
                q = q.detach().requires_grad_(True)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=ctx.scale)
                (dq,) = torch.autograd.grad(out, q, grad)
        return dq, None, None, None, None, None, None


def attend_to_tokens(q: Tensor, tokens: Tensor, keys_values: KeysValues, scale: float,
                     key_mask: Tensor | None = None, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Query rows attend to the original tokens only: the attention step of :meth:`Backbone.run_block_with_queries`.

    Args:
        q: (B, H, T, d) projected query rows (carry the gradient).
        tokens: (B, N, D) the block input; keys and values come from it only, so queries never see each other.
        keys_values: block input (B, N, D) -> keys, values, each (B, H, N, d), with the block's frozen weights.
        scale: the attention's softmax scale (usually ``d ** -0.5``).
        key_mask: additive mask broadcastable to (B, H, T, N), e.g. a (B, 1, 1, N) padding mask.
        kv: keys and values already computed from ``tokens`` (e.g. captured from the plain block call).

    Returns:
        (B, H, T, d). Only ``q`` gets a gradient; backward keeps ``tokens`` and recomputes the keys and values.
    """
    tokens = tokens.detach()
    if kv is None:
        with torch.no_grad():
            kv = keys_values(tokens)
    out: Tensor = _AttendToTokens.apply(q, tokens, kv[0], kv[1], key_mask, keys_values, scale)
    return out


def per_channel_stats(cfg: dict[str, Any], given: dict[str, Any], owner: str,
                      model_channels: int | None = None) -> dict[str, Any]:
    """Make ``cfg``'s ``mean`` and ``std`` tuples of one value per input channel (``input_size[0]``).

    One value stands for every channel (the gray statistics of data whose gray images are repeated over a colour
    model's channels, as the digit datamodules do). The model's own statistics of another length are averaged
    (ImageNet's 3 values on a 1-channel model). Any other count in ``given`` (the user's ``data_config``), or an
    ``input_size`` whose channels differ from ``model_channels``, is an error naming ``owner``: backbones call this
    when they are built, so the mistake is not found deep inside a datamodule's ``setup`` or the first forward.
    """
    cfg["input_size"] = tuple(cfg["input_size"])
    channels = cfg["input_size"][0]
    if model_channels is not None and channels != model_channels:
        raise ValueError(
            f"data_config input_size {cfg['input_size']} has {channels} channels but {owner} takes "
            f"{model_channels}-channel input: give input_size ({model_channels}, H, W) or drop it from data_config"
        )
    for key in ("mean", "std"):
        value = tuple(cfg[key]) if isinstance(cfg[key], (list, tuple)) else (cfg[key],)  # YAML `mean: 0.5`
        if len(value) != channels:
            if key in given and len(value) != 1:
                raise ValueError(
                    f"data_config {key} has {len(value)} values but {owner} takes {channels}-channel input: give "
                    f"{channels} values (or one for every channel) or drop {key} from data_config"
                )
            value = (sum(value) / len(value),) * channels
        cfg[key] = value
    return cfg


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a weights file safely: safetensors, or a torch file with ``weights_only=True`` (never unpickles code).

    Nested ``{"state_dict": ...}`` / ``{"model": ...}`` containers and a DataParallel ``module.`` prefix are unwrapped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint_path {str(path)!r} does not exist: pass the path of a weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as err:  # SafetensorError names neither the file nor the cause (a cut-off download)
            raise ValueError(
                f"cannot read {str(path)!r} as a safetensors file: {err}. The file is truncated (an interrupted "
                "download or copy) or not a safetensors file: download or export it again, or pass a torch state "
                "dict with another suffix"
            ) from err
    else:
        state = read_weights(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_into(module: nn.Module, state: dict[str, Tensor], source: str, ignore_prefixes: Sequence[str] = ()) -> None:
    """Strictly load ``state`` into ``module``; the error names missing, unexpected and mis-shaped keys."""
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    own = module.state_dict()
    missing = [k for k in own if k not in state and not any(k.startswith(p) for p in ignore_prefixes)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def _few(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_few(shapes)}")
        raise ValueError(
            f"checkpoint {source!r} does not match {type(module).__name__}: " + "; ".join(parts)
            + ". Check that model_name / model_kwargs match the architecture the file was saved from"
        )
    module.load_state_dict(state, strict=False)
