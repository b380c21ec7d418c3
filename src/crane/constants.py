"""Numbers fixed by the backbones' pre-training (SPEC §2)."""

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Reference input size for both CLIP and DINOv2 (37x37 patch grid at patch size 14).
DEFAULT_IMAGE_SIZE = 518

#: ``--attention NAME`` -> the ``torch.nn.attention.SDPBackend`` member that
#: ``scaled_dot_product_attention`` tries first (None: torch's own order).
ATTENTION_KERNELS: dict[str, str | None] = {
    "auto": None,
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
