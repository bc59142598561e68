"""Model checkpoints of random weights, saved as a user's local files are, for the tests of the code that loads
them (nothing is downloaded here)."""

from __future__ import annotations


def tiny_sam(folder) -> str:
    """A SAM checkpoint of random weights, small enough for a test, saved as a user's local folder is."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(0)
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_dim": 64, "image_size": 256,
              "output_channels": 32, "window_size": 4, "global_attn_indexes": [1], "num_pos_feats": 16}  # fmt: skip
    config = SamConfig(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": 32, "image_size": 256, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_dim": 64,
                             "iou_head_hidden_dim": 32},
    )  # fmt: skip
    SamModel(config).save_pretrained(folder)
    processor = SamImageProcessor(size={"longest_edge": 256}, pad_size={"height": 256, "width": 256})
    SamProcessor(image_processor=processor).save_pretrained(folder)
    return str(folder)
