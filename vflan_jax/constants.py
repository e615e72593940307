"""LLaVA's token conventions, shared by the data pipeline, the model, conversion and inference.

They are original LLaVA's values (llava/constants.py), so that its annotation files, token ids
and labels mean the same here (docs/REFERENCE.md §1.4)."""

IGNORE_INDEX = -100        # the label of a token that takes no loss (also torch cross_entropy's default)
IMAGE_PLACEHOLDER = -200   # LLaVA's IMAGE_TOKEN_INDEX: one image in token ids, no vocabulary entry; expanded
                           # to tokens_per_image copies of the model's image_token_id before embedding
IMAGE_TOKEN = "<image>"    # where an image stands in the text (LLaVA's DEFAULT_IMAGE_TOKEN)
