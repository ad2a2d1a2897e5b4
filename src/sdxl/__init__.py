"""sdxl: Stable Diffusion XL from scratch.

    import sdxl, torch
    pipe = sdxl.load("sd_xl_base_1.0.safetensors", device="cuda", dtype=torch.float16)
    images = pipe.generate(sdxl.GenerationRequest(prompt="a photo of a cat", seed=1)).images
"""

from .version import __version__ as __version__


def __getattr__(name):  # lazy: `import sdxl` stays cheap (no torch) until something is used
    if name in ("load", "SDXL", "GenerationResult"):
        from . import pipeline  # lazy: `import sdxl` stays torch-free until a model is used

        return getattr(pipeline, name)
    if name in ("GenerationRequest", "LoraSpec", "RequestError"):
        from . import request  # lazy: as above

        return getattr(request, name)
    raise AttributeError(name)
