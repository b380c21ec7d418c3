"""Text side (SPEC §4): learnable prompts, shared deep tokens, optional image context.

Parameter and buffer names match the released checkpoints' ``prompt_learner`` state dict,
so those files load with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from crane.config import CraneConfig
from crane.errors import CraneError


class PromptLearner(nn.Module):
    """``ctx_pos``/``ctx_neg`` (1,1,n_ctx,D) and ``compound_prompts_text.i`` (deep_len, D).

    The template embeddings (``token_prefix_*``, ``token_suffix_*``) and token ids
    (``tokenized_prompts_*``) are buffers; the released files carry their own copies, which
    the reference used and which are kept on load (SPEC §7), except for a template that
    ``create_model``'s overrides change (``anomaly_template=...``).
    """

    def __init__(self, clip: nn.Module, cfg: CraneConfig):
        super().__init__()
        dim = clip.ln_final.weight.shape[0]
        layers = len(clip.transformer.resblocks)
        if cfg.n_deep > layers - 1 or cfg.deep_len > cfg.n_ctx:
            raise CraneError(
                f"n_deep={cfg.n_deep}, deep_len={cfg.deep_len}: deep prompts go into text "
                f"layers 2..{layers} of this CLIP (n_deep <= {layers - 1}) and over the "
                f"learnable context tokens (deep_len <= n_ctx = {cfg.n_ctx})"
            )
        self.n_ctx, self.deep_len = cfg.n_ctx, cfg.deep_len
        self.ctx_pos = nn.Parameter(torch.randn(1, 1, cfg.n_ctx, dim) * 0.02)
        self.ctx_neg = nn.Parameter(torch.randn(1, 1, cfg.n_ctx, dim) * 0.02)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.randn(cfg.deep_len, dim) * 0.02) for _ in range(cfg.n_deep)]
        )
        tokenizer = open_clip.get_tokenizer(cfg.clip_model)
        prefix = " ".join(["X"] * cfg.n_ctx)
        for tag, template in (("pos", cfg.normal_template), ("neg", cfg.anomaly_template)):
            ids = tokenizer([f"{prefix} {template}"])  # (1, 77)
            length = ids.shape[-1]
            if int(ids[0].argmax()) > length - 2:  # (EOT, the largest id, in the last slot)
                shown = template if len(template) <= 60 else template[:57] + "..."
                raise CraneError(
                    f"the {tag} prompt ({cfg.n_ctx} context tokens + {shown!r}) does not "
                    f"fit CLIP's {length}-token context with a slot to spare (the image context "
                    "token takes one): use a smaller n_ctx or a shorter template"
                )
            with torch.no_grad():
                emb = clip.token_embedding(ids).float()
            self.register_buffer(f"tokenized_prompts_{tag}", ids.view(1, 1, -1).int())
            self.register_buffer(f"token_prefix_{tag}", emb[:, None, :1].clone())
            self.register_buffer(f"token_suffix_{tag}", emb[:, None, 1 + cfg.n_ctx :].clone())

    def prompts(self, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings and EOT positions.

        Without ``context``: (2, L, D) and (2,) for [normal, anomalous].
        With ``context`` (B, D) — the image's own global feature inserted right after the
        learnable tokens, suffix shortened by one, EOT shifted by +1 — (B, 2, L, D) and (B, 2).
        """
        rows, eots = [], []
        for tag in ("pos", "neg"):
            ctx = getattr(self, f"ctx_{tag}")[0, 0]
            prefix = getattr(self, f"token_prefix_{tag}")[0, 0]
            suffix = getattr(self, f"token_suffix_{tag}")[0, 0]
            eot = getattr(self, f"tokenized_prompts_{tag}")[0, 0].argmax()
            if context is None:
                rows.append(torch.cat([prefix, ctx, suffix]))
                eots.append(eot)
            else:
                b = context.shape[0]
                ctx_b = torch.cat([ctx.expand(b, -1, -1), context[:, None].to(ctx.dtype)], dim=1)
                rows.append(
                    torch.cat(
                        [prefix.expand(b, -1, -1), ctx_b, suffix[:-1].expand(b, -1, -1)], dim=1
                    )
                )
                eots.append((eot + 1).expand(b))
        if context is None:
            return torch.stack(rows), torch.stack(eots)
        return torch.stack(rows, dim=1), torch.stack(eots, dim=1)


class PromptTextEncoder(nn.Module):
    """Runs prompt embeddings through CLIP's text tower, inserting the deep tokens."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(
        self,
        embeds: torch.Tensor,
        eot: torch.Tensor,
        deep: list[torch.Tensor] | None,
        deep_len: int,
    ) -> torch.Tensor:
        """(M, L, D) embeddings, (M,) EOT positions → (M, E) L2-normalised text features."""
        clip = self.clip
        x = embeds + clip.positional_embedding.to(embeds.dtype)
        mask = clip.attn_mask
        # Reference quirk: deep tokens are rounded to fp16 before insertion.
        deep = _fp16_rounded(deep) if deep else deep
        for i, blk in enumerate(clip.transformer.resblocks):
            if deep and 1 <= i <= len(deep):
                tok = deep[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], tok, x[:, 1 + deep_len :]], dim=1)
            x = blk(x, attn_mask=mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return F.normalize(x @ clip.text_projection, dim=-1)


@torch.compiler.disable
def _fp16_rounded(tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor rounded to fp16 and back (SPEC §4's quirk of the deep text tokens). Left
    out of torch.compile's graphs: inductor drops a cast pair such as this one, and with it
    the rounding (the text features of image-context inference moved by 2e-5)."""
    return [t.half().to(t.dtype) for t in tokens]
