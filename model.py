"""TinyLLaVA-Video: a SigLIP vision encoder, a connector and a Qwen2 decoder (work in progress)."""

IMAGE_TOKEN_INDEX = -200  # the placeholder id in prompt ids; the model puts the video tokens here
