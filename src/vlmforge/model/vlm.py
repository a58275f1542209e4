"""VisionLanguageModel: vision tower -> projector -> any transformers causal LM.

Each image is N consecutive `<image>` ids in `input_ids` (expanded by the data layer); the
projected features replace those embeddings. Attention over a packed row is `causal` or
`document` (model.attention), positions `restart` / `continue` / `v2pe` (model.positions).
The module holds `vision`, `projector`, `llm` and no parallelism: the trainer shards
`llm_layers()` and `vision_layers()`.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmforge.arch.geometry import layout_from, preprocess_spec_for
from vlmforge.arch.tiles import ImageLayout
from vlmforge.config.model import ModelConfig
from vlmforge.model import attention as attn
from vlmforge.model import positions as pos
from vlmforge.model.lm_head import token_logprobs
from vlmforge.model.tower import encoder_layers, inner, layers_used, patch_features


class ImageTokenMismatch(ValueError):
    """`<image>` placeholders and pixel_values do not match; the message names the row and sample."""


class VisionLanguageModel(nn.Module):
    def __init__(self, vision: nn.Module, projector: nn.Module, llm: nn.Module, model_cfg: ModelConfig, image_token_id: int):
        super().__init__()
        self.vision, self.projector, self.llm = vision, projector, llm
        self.image_token_id = int(image_token_id)
        self.feature_layer = int(model_cfg.vision.feature_layer)
        self.image_size = int(model_cfg.vision.image_size or vision.config.image_size)
        self.attention = model_cfg.attention
        self.positions = model_cfg.positions
        self.v2pe_delta = float(model_cfg.v2pe_delta)
        self.v2pe_max_denominator = int(model_cfg.v2pe_max_denominator)
        self.images = model_cfg.images  # tiling and wrap: how generation and eval expand `<image>`
        self.use_flash = False  # set by build_vlm when flash-attn varlen is chosen
        self.loss_chunk_tokens = 0  # train.loss_chunk_tokens: the head in chunks of this many tokens (0 = at once)
        self.fused_loss = "off"  # train.fused_loss (set by place_model)
        self.tokens_per_image  # noqa: B018 - fail at build time on an impossible geometry (odd grid for pixel shuffle)
        self.apply_freeze(model_cfg)

    # ---- geometry (run settings, not weights) ----
    @property
    def patch_grid(self) -> int:
        return self.image_size // self.vision.config.patch_size

    @property
    def pool_size(self) -> int | None:
        return getattr(self.projector, "pool_size", None)

    def set_pool_size(self, k: int | None) -> None:
        """Change the visual tokens per image (avgpool_mlp only): k*k, or None for the full grid."""
        if not hasattr(self.projector, "pool_size"):
            raise ValueError(f"{self.projector.kind} has a fixed number of tokens; pool_size applies to avgpool_mlp")
        self.projector.tokens(self.patch_grid, k)  # validates
        self.projector.pool_size = k

    @property
    def tokens_per_image(self) -> int:
        return self.projector.tokens(self.patch_grid, self.pool_size)

    def image_layout(self, tokenizer=None) -> ImageLayout:
        """How this model's images become tower passes (tiles) and placeholder ids (same as
        vlmforge.arch.geometry.image_layout of its recipe); ``tokenizer`` for a text wrap."""
        return layout_from(self.images, self.tokens_per_image, self.image_size, tokenizer)

    def preprocess_spec(self) -> dict:
        """Image preprocessing for this tower (same as vlmforge.arch.geometry.image_preprocess_spec)."""
        return preprocess_spec_for(self.vision.config.model_type, self.image_size)

    def apply_run_settings(self, model_cfg: ModelConfig) -> None:
        """Settings a stage may change on a loaded checkpoint: attention, positions, V2PE delta,
        pool size (avgpool_mlp), tiling and wrap (model.images) and the freeze policy. Architecture keys are not touched."""
        self.attention = model_cfg.attention
        self.positions = model_cfg.positions
        self.v2pe_delta = float(model_cfg.v2pe_delta)
        self.v2pe_max_denominator = int(model_cfg.v2pe_max_denominator)
        self.images = model_cfg.images
        if hasattr(self.projector, "pool_size"):
            self.set_pool_size(model_cfg.projector.pool_size)
        self.apply_freeze(model_cfg)

    # ---- parameters ----
    def vision_layers(self) -> nn.ModuleList:
        return encoder_layers(self.vision)

    def llm_layers(self) -> nn.ModuleList:
        base = self.llm.base_model  # the decoder stack (Qwen2Model, LlamaModel, ...)
        return base.layers if hasattr(base, "layers") else base.h

    def apply_freeze(self, model_cfg: ModelConfig) -> None:
        """Vision frozen by default, projector and LLM trainable; vision blocks after the feature
        layer, SigLIP's post-layernorm and pooling head are never run and always frozen."""
        self.vision.requires_grad_(not model_cfg.vision.frozen)
        self.projector.requires_grad_(not model_cfg.projector.frozen)
        self.llm.requires_grad_(not model_cfg.llm.frozen)
        for layer in self.vision_layers()[layers_used(self.vision, self.feature_layer):]:
            layer.requires_grad_(False)
        for name in ("post_layernorm", "head"):
            mod = getattr(inner(self.vision), name, None)
            if mod is not None:
                mod.requires_grad_(False)
        self.vision_frozen = not any(p.requires_grad for p in self.vision.parameters())

    def trainable_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            name: [p for p in getattr(self, name).parameters() if p.requires_grad]
            for name in ("vision", "projector", "llm")
        }

    def use_sdpa(self) -> None:
        """Leave flash-attn varlen (e.g. for generation with 4D masks or a CPU run): sdpa + additive masks."""
        if self.llm.config._attn_implementation != "sdpa":
            self.llm.set_attn_implementation("sdpa")
        self.use_flash = False

    # ---- forward pieces ----
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, tokens_per_image, llm hidden]."""
        if self.vision_frozen:
            with torch.no_grad():
                feats = patch_features(self.vision, pixel_values, self.feature_layer)
        else:
            feats = patch_features(self.vision, pixel_values, self.feature_layer)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(feats.to(proj_dtype))

    def check_placeholders(self, input_ids: torch.Tensor, seq_ids: torch.Tensor | None, n_images: int) -> None:
        """Every run of `<image>` ids must be whole images and the total must match pixel_values."""
        t = self.tokens_per_image
        ids = input_ids.detach().cpu()
        sids = seq_ids.detach().cpu() if seq_ids is not None else torch.zeros_like(ids)
        is_img = ids == self.image_token_id
        counts = []
        for r in range(ids.shape[0]):
            row = is_img[r].tolist()
            j, n = 0, len(row)
            while j < n:
                if not row[j]:
                    j += 1
                    continue
                k = j
                while k < n and row[k] and sids[r, k] == sids[r, j]:
                    k += 1
                if (k - j) % t:
                    raise ImageTokenMismatch(
                        f"row {r}, packed sample {int(sids[r, j])}: a run of {k - j} <image> tokens at "
                        f"position {j} is not a whole number of images ({t} visual tokens per image)"
                    )
                counts.append((r, int(sids[r, j]), (k - j) // t))
                j = k
        total = sum(c for _, _, c in counts)
        if total != n_images:
            per = ", ".join(f"row {r} sample {s}: {c}" for r, s, c in counts) or "none"
            raise ImageTokenMismatch(
                f"the <image> placeholders stand for {total} image(s) ({per}) but pixel_values holds "
                f"{n_images}; the data layer must expand each image to {t} tokens"
            )

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, seq_ids=None,
              image_map: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features scattered in. ``image_map`` [n]: the k-th image in the
        rows (in order of appearance) is ``pixel_values[image_map[k]]``, so an image used by several
        rows (a preference pair's chosen and rejected rows) is encoded once."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if image_map is not None:
            n_images = int(image_map.numel())
        self.check_placeholders(input_ids, seq_ids, n_images)
        if n_images:
            feats = self.encode_images(pixel_values).to(embeds.dtype)
            if image_map is not None:
                feats = feats[image_map]
            where = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(where, feats.reshape(-1, feats.shape[-1]))
        return embeds

    def draw_v2pe_deltas(self, input_ids: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
        """Training's random V2PE step, one per tower pass (positions index deltas per pass). With
        tiles, one draw per image - its run of consecutive placeholders - repeated over its tiles, so
        the grid and thumbnail of one image advance alike (InternVL: one step per <img> span)."""
        is_img = input_ids == self.image_token_id
        if not self.images.tiles:
            return pos.draw_v2pe_deltas(int(is_img.sum()) // self.tokens_per_image, self.v2pe_max_denominator)
        prev = torch.zeros_like(is_img)
        prev[:, 1:] = is_img[:, :-1] & (seq_ids[:, 1:] == seq_ids[:, :-1])
        run = torch.cumsum((is_img & ~prev).flatten().long(), 0)[is_img.flatten()]  # run number of each placeholder
        tiles = torch.bincount(run)[1:] // self.tokens_per_image
        per_image = pos.draw_v2pe_deltas(int(tiles.numel()), self.v2pe_max_denominator)
        return per_image.repeat_interleave(tiles)

    def position_ids_for(self, input_ids, seq_ids, position_ids=None, v2pe_delta=None) -> torch.Tensor:
        if self.positions == "continue":
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if self.positions == "v2pe":
            if v2pe_delta is None:
                if self.training:
                    v2pe_delta = self.draw_v2pe_deltas(input_ids, seq_ids)
                else:
                    v2pe_delta = self.v2pe_delta
            return pos.v2pe_positions(input_ids, seq_ids, self.image_token_id, self.tokens_per_image, v2pe_delta)
        if position_ids is not None:
            return position_ids
        return pos.restart_positions(seq_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        v2pe_delta: float | torch.Tensor | None = None,
        output: str = "logits",
        branch_ids: torch.Tensor | None = None,
        image_map: torch.Tensor | None = None,
        pred_index: torch.Tensor | None = None,
        target_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What ``output`` names: "logits" [B, L, V]; "hidden", the final normed hidden states
        [B, L, D]; "target_logprobs", fp32 [T] log p(target_ids[t]) read at the flat position
        ``pred_index[t]`` (row * L + column) - what every training objective needs, computed without
        the full logits (in chunks of ``loss_chunk_tokens``). Computed inside forward so that
        FSDP2 holds the head's weights unsharded.

        `seq_ids` None = one sample per row, no padding. `branch_ids`: the shared-prompt layout of
        preference pairs (see vlmforge.model.attention). `image_map`: see :meth:`embed`.
        `v2pe_delta`: a float, or one value per image; None = drawn in training, config value in eval."""
        if output not in ("logits", "hidden", "target_logprobs"):
            raise ValueError(f"output must be logits, hidden or target_logprobs, got {output!r}")
        if seq_ids is None:
            seq_ids = torch.zeros_like(input_ids)
        embeds = self.embed(input_ids, pixel_values, seq_ids, image_map)
        positions = self.position_ids_for(input_ids, seq_ids, position_ids, v2pe_delta)
        if self.use_flash and (not embeds.is_cuda or branch_ids is not None):
            self.use_sdpa()  # flash varlen has no CPU kernel and no branch mask
        if self.use_flash:
            b, n, d = embeds.shape
            out = self.llm.base_model(
                inputs_embeds=embeds.reshape(1, b * n, d),
                position_ids=positions.reshape(1, b * n),
                use_cache=False,
                **attn.varlen_kwargs(seq_ids, self.attention),
            )
            hidden = out.last_hidden_state.reshape(b, n, -1)
        else:
            mask = attn.additive_mask(seq_ids, self.attention, embeds.dtype, branch_ids)
            out = self.llm.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
            hidden = out.last_hidden_state
        if output == "hidden":
            return hidden
        head = self.llm.get_output_embeddings()
        if output == "target_logprobs":
            if pred_index is None or target_ids is None:
                raise ValueError('output="target_logprobs" needs pred_index and target_ids')
            picked = hidden.reshape(-1, hidden.shape[-1])[pred_index]
            return token_logprobs(picked, head, target_ids, int(self.loss_chunk_tokens), self.fused_loss)
        return head(hidden)
